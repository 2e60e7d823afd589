"""The attached model's class (issue 32, item 1): attach gives the model a subclass of its own class whose
``forward`` and ``generate`` name the task-id keywords as real parameters, with no hooks and no instance methods on
the model; detach gives the class back; load_attached builds the same class; the ids of a call are that call's only,
also when two threads call one model at once; an attached model pickles."""

from __future__ import annotations

import inspect
import pickle
import threading

import pytest
import torch
from torch import nn

import cmoe
from cmoe.plugins.attached_model import _with_task_id_keywords, attached_class
from cmoe.plugins.tiny import llava_inputs, tiny_llava

OPTIONS = dict(num_experts=4, top_k=2, router="task_token", num_tasks=3, init_noise=0.5)


def _seen_task_ids(connector: nn.Module) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    connector.router.register_forward_pre_hook(lambda module, args: seen.append(args[1].clone()))
    return seen


@pytest.mark.smoke
def test_attach_swaps_in_a_subclass_of_the_models_class_and_detach_swaps_it_back() -> None:
    from transformers import LlavaForConditionalGeneration

    model = tiny_llava()
    base_forward = inspect.signature(model.forward).parameters
    cmoe.attach(model, **OPTIONS)
    cls = type(model)
    assert cls is attached_class(LlavaForConditionalGeneration) and cls.__bases__[-1] is LlavaForConditionalGeneration
    assert isinstance(model, LlavaForConditionalGeneration) and cls.__name__ == "LlavaForConditionalGeneration"
    parameters = inspect.signature(model.forward).parameters
    assert list(parameters) == [*[n for n in base_forward if n != "kwargs"], "task_ids", "cmoe_task_ids", "kwargs"]
    assert all(parameters[n].kind is inspect.Parameter.KEYWORD_ONLY for n in ("task_ids", "cmoe_task_ids"))
    assert "task_ids" in inspect.signature(model.generate).parameters
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert not {"forward", "generate", "__call__"} & set(model.__dict__)
    with pytest.raises(TypeError, match="multiple values for argument 'input_ids'"):
        model.forward(torch.ones(1, 2, dtype=torch.long), input_ids=torch.ones(1, 2, dtype=torch.long))
    cmoe.detach(model)
    assert type(model) is LlavaForConditionalGeneration and "_cmoe_attachment" not in model.__dict__


def test_the_built_forward_binds_and_passes_arguments_as_the_method_would() -> None:
    calls: list[tuple] = []

    class Odd(nn.Module):
        def forward(self, a, /, b=1, *rest, c=2, d, **extra):
            return a, b, rest, c, d, extra

    def run(model, invoke, inputs, ids):
        calls.append((inputs, ids))
        return invoke()

    built = _with_task_id_keywords(Odd.forward, run)
    names = list(inspect.signature(built).parameters)
    assert names == ["self", "a", "b", "rest", "c", "d", "task_ids", "cmoe_task_ids", "extra"]
    model = Odd()
    assert built(model, 0, 5, 6, 7, d=3, e=4, task_ids=[1]) == (0, 5, (6, 7), 2, 3, {"e": 4})
    assert calls[-1][0] == {"a": 0, "b": 5, "c": 2, "d": 3, "e": 4} and calls[-1][1].tolist() == [1]
    assert built(model, 0, d=3, cmoe_task_ids=2) == Odd.forward(model, 0, d=3)
    with pytest.raises(TypeError, match="missing 1 required keyword-only argument: 'd'"):
        built(model, 0)


def test_load_attached_builds_the_class_attach_gives(tmp_path) -> None:
    torch.manual_seed(0)
    model = tiny_llava()
    cmoe.attach(model, **OPTIONS)
    model.save_pretrained(tmp_path)
    loaded = cmoe.load_attached(tmp_path)
    assert type(loaded) is type(model)
    batch = llava_inputs(model, batch=2)
    with torch.no_grad():
        assert torch.equal(loaded(**batch, task_ids=[2, 0]).logits, model(**batch, task_ids=[2, 0]).logits)


@pytest.mark.smoke
def test_two_threads_calling_one_model_route_by_their_own_ids() -> None:
    """Both calls have begun before either reaches the connector (a barrier before the vision tower): each routes
    by its own ids. (With the ids kept on the model, the second call's overwrote the first's.)"""
    torch.manual_seed(0)
    model = tiny_llava().eval()
    connector = cmoe.attach(model, **OPTIONS)
    barrier = threading.Barrier(2, timeout=30)
    seen: dict[str, list[int]] = {}

    def meet(module, args):
        barrier.wait()

    def record(module, args):
        seen[threading.current_thread().name] = args[1].tolist()

    model.model.vision_tower.register_forward_pre_hook(meet)
    connector.router.register_forward_pre_hook(record)
    batch = llava_inputs(model, batch=2)
    errors: list[BaseException] = []

    def call(ids: list[int]) -> None:
        try:
            with torch.no_grad():
                model(**batch, task_ids=ids)
        except BaseException as error:  # a failure in the thread is reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=call, args=(ids,), name=str(ids)) for ids in ([2, 0], [1, 1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    assert seen == {"[2, 0]": [2, 0], "[1, 1]": [1, 1]}


def test_an_attached_model_pickles_as_an_attached_model() -> None:
    """Pickled before its first call: transformers' own output-capturing hooks, installed at a model's first forward,
    make any model (attached or not) unpicklable after it."""
    torch.manual_seed(0)
    model = tiny_llava().eval()
    cmoe.attach(model, **OPTIONS)
    batch = llava_inputs(model, batch=2)
    copy = pickle.loads(pickle.dumps(model))
    assert type(copy) is type(model)
    connector = cmoe.attached_model(copy).model.multi_modal_projector.linear_1.connector
    seen = _seen_task_ids(connector)
    with torch.no_grad():
        assert torch.equal(copy(**batch, task_ids=[1, 2]).logits, model(**batch, task_ids=[1, 2]).logits)
    assert [ids.tolist() for ids in seen] == [[1, 2]]
    cmoe.detach(copy)
    assert type(copy) is type(model).__bases__[-1]

