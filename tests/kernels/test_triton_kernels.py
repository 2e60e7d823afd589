"""The fused triton kernels against the ``loop`` reference, run in triton's CPU interpreter (conftest sets
``TRITON_INTERPRET=1`` when there is no CUDA). Small shapes; forward and every gradient."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import cmoe
from cmoe.errors import CMoEError
from dispatch_cases import assert_compiled_step_matches_eager, build, max_relative_error, random_cases, run

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs TRITON_INTERPRET=1 on CPU (set by tests/conftest.py)", allow_module_level=True)

from cmoe.kernels import align, triton_moe_project  # noqa: E402  (after the interpreter check)

CASES = random_cases(36, seed=1234, max_tokens=40, max_width=40)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 5e-3}


@pytest.mark.smoke
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_kernels_match_loop_forward_and_every_gradient(case) -> None:
    tensors = build(case, DEVICE, seed=hash(case.id) % 10_000)
    got = run(*tensors, backend="triton_kernels", dtype=torch.float32)
    ref = run(*tensors, backend="loop", dtype=torch.float32)
    error, which = max_relative_error(got, ref)
    assert error < TOLERANCE[torch.float32], f"tensor #{which} (0=out, 1=dx, 2=dw, then params) off by {error:.2e}"


def assert_variant_matches_loop(case, pins: dict[str, dict[str, int]]) -> None:
    """The kernels with tuning variants pinned per role (`pins`): forward and every gradient as the loop gives."""
    from cmoe.kernels import pin_config

    tensors = build(case, DEVICE, seed=hash(case.id) % 10_000)
    for role, values in pins.items():
        pin_config(role, **values)
    try:
        got = run(*tensors, backend="triton_kernels", dtype=torch.float32)
    finally:
        for role in pins:
            pin_config(role)
    ref = run(*tensors, backend="loop", dtype=torch.float32)
    error, which = max_relative_error(got, ref)
    assert error < TOLERANCE[torch.float32], f"tensor #{which} (0=out, 1=dx, 2=dw, then params) off by {error:.2e}"


@pytest.mark.parametrize("case", CASES[:12], ids=[c.id for c in CASES[:12]])
def test_staged_gather_weight_grad_matches_loop(case) -> None:
    """The weight-gradient tuning candidate that stages the gathered rows a block ahead (``stage_rows=1``) on the
    edge cases (one token, k = E, one expert taking every token over several blocks, empty experts, odd
    widths) and a few random ones."""
    assert_variant_matches_loop(case, {"weight_grad": {"stage_rows": 1}})


@pytest.mark.parametrize("case", CASES[:12], ids=[c.id for c in CASES[:12]])
def test_weights_through_tensor_descriptors_match_loop(case) -> None:
    """The GEMM tuning candidate that loads the expert weights through a tensor descriptor (``tma_weight=1``;
    both layouts: ``[E, out, in]`` read transposed in the forward, as stored in the input gradient) on the edge
    cases and a few random ones."""
    assert_variant_matches_loop(case, {role: {"tma_weight": 1} for role in ("forward", "backward_input")})


@pytest.mark.parametrize("case", CASES[:9], ids=[c.id for c in CASES[:9]])
def test_persistent_tile_scheduling_matches_loop(case) -> None:
    """The GEMM tuning candidate with persistent tile scheduling (``persistent=1``: a few programs, each
    looping over the tiles; 3 in the interpreter, so each takes several, unevenly) on the edge cases (one
    token, k = E, one expert taking every token, empty experts, padded blocks past the used ones, one-wide
    inputs) and a few random ones."""
    assert_variant_matches_loop(case, {role: {"persistent": 1} for role in ("forward", "backward_input")})


VARIANT_CASES = [CASES[i] for i in (0, 2, 3, 6)]  # 16×16 and 8×8 meet TMA's alignment in bf16, the others not


@pytest.mark.parametrize("case", VARIANT_CASES, ids=[c.id for c in VARIANT_CASES])
def test_both_tuning_variants_in_bfloat16_match_the_float32_loop(case) -> None:
    """``tma_weight``, ``persistent`` and ``stage_rows`` together in bf16, the GPU's working dtype (where TMA's
    alignment allows; the other launches fall back to pointer loads)."""
    from cmoe.kernels import pin_config

    tensors = build(case, DEVICE, seed=7)
    for role in ("forward", "backward_input"):
        pin_config(role, tma_weight=1, persistent=1)
    pin_config("weight_grad", stage_rows=1)
    try:
        got = run(*tensors, backend="triton_kernels", dtype=torch.bfloat16)
    finally:
        for role in ("forward", "backward_input", "weight_grad"):
            pin_config(role)
    error, which = max_relative_error(got, run(*tensors, backend="loop", dtype=torch.float32))
    assert error < TOLERANCE[torch.bfloat16], f"tensor #{which} off by {error:.2e} in bfloat16"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("case", CASES[:4], ids=[c.id for c in CASES[:4]])
def test_kernels_in_other_dtypes_match_the_float32_loop(case, dtype: torch.dtype) -> None:
    tensors = build(case, DEVICE, seed=7)
    got = run(*tensors, backend="triton_kernels", dtype=dtype)
    ref = run(*tensors, backend="loop", dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    error, which = max_relative_error(got, ref)
    assert all(t.dtype == dtype for t in got)
    assert error < TOLERANCE[dtype], f"tensor #{which} off by {error:.2e} in {dtype}"


def test_gradcheck_float64_through_the_kernels() -> None:
    experts = cmoe.MLPExperts(3, 5, 4).double()
    params = tuple(p.detach().clone().to(DEVICE).requires_grad_() for layer in experts.layers for p in layer)
    x = torch.randn(6, 5, dtype=torch.float64, device=DEVICE, requires_grad=True)
    scores, index = torch.randn(6, 3, device=DEVICE).topk(2)
    weight = scores.softmax(-1).double().requires_grad_()

    def fused(x, weight, w1, b1, w2, b2):
        return torch.ops.cmoe.triton_moe_forward(x, index, weight, [w1, w2], [b1, b2], [True, True], "gelu",
                                                 16, True)[0]

    assert torch.autograd.gradcheck(fused, (x, weight, *params))


@pytest.mark.parametrize("kind, bias, top_k", [("mlp", True, 2), ("linear", False, 2), ("mlp", False, 1)])
def test_custom_ops_pass_opcheck(kind: str, bias: bool, top_k: int) -> None:
    """Schema, fake (meta) shapes, the registered autograd formula and AOT tracing of both ops: what
    ``torch.compile`` relies on."""
    experts = (cmoe.MLPExperts if kind == "mlp" else cmoe.LinearExperts)(3, 5, 4, bias=bias).to(DEVICE)
    weights = [w.detach().clone().requires_grad_() for w, _ in experts.layers]
    biases = [b.detach().clone().requires_grad_() for _, b in experts.layers if b is not None]
    has_bias = [b is not None for _, b in experts.layers]
    x = torch.randn(9, 5, device=DEVICE, requires_grad=True)
    scores, index = torch.randn(9, 3, device=DEVICE).topk(top_k)
    weight = scores.softmax(-1).requires_grad_()
    args = (x, index, weight, weights, biases, has_bias, experts.activation_name, 16, True)
    torch.library.opcheck(torch.ops.cmoe.triton_moe_forward, args)
    out, sorted_pair, block_expert, block_offsets, hidden, preacts = torch.ops.cmoe.triton_moe_forward(*args)
    assert len(hidden) == len(preacts) == len(weights) - 1
    grad = torch.randn_like(out)
    for needs_x_grad, needs_route_grad in ((True, True), (False, True), (True, False), (False, False)):
        torch.library.opcheck(torch.ops.cmoe.triton_moe_backward,
                              (grad, x.detach(), index, weight.detach(), sorted_pair, block_expert, block_offsets,
                               [h.detach() for h in hidden], [p.detach() for p in preacts],
                               [w.detach() for w in weights], [b.detach() for b in biases], has_bias,
                               experts.activation_name, 16, needs_x_grad, needs_route_grad))


@pytest.mark.parametrize("kind", ["linear", "mlp"])
def test_frozen_input_trains_the_experts_and_the_routing_weights(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """x without a gradient (frozen visual features, the Uni-Med case): the backward skips the first layer's dx
    launch yet gives the routing-weight and parameter gradients of the reference."""
    from cmoe.kernels import ops

    roles = []
    launch = ops.gemm

    def counted(*args, **kwargs):
        roles.append(kwargs.get("role"))
        return launch(*args, **kwargs)

    monkeypatch.setattr(ops, "gemm", counted)
    experts = (cmoe.MLPExperts if kind == "mlp" else cmoe.LinearExperts)(4, 9, 7).to(DEVICE)
    x = torch.randn(30, 9, device=DEVICE)
    scores, index = torch.randn(30, 4, device=DEVICE).topk(2)
    grads = {}
    for backend in ("loop", "triton"):
        experts.zero_grad(set_to_none=True)
        weight = scores.softmax(-1).detach().requires_grad_()
        out = cmoe.moe_project(x, experts, index, weight, backend=backend)
        out.square().sum().backward()
        grads[backend] = [weight.grad, *[p.grad.clone() for p in experts.parameters()]]
    for got, ref in zip(grads["triton"], grads["loop"], strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    # linear: the one layer's launch yields the routing gradient; mlp: only the last layer's launch runs
    assert roles.count("backward_input") == 1


@pytest.mark.parametrize("expert", ["linear", "mlp"])
def test_connector_compiles_in_one_graph_with_the_triton_backend(expert: str) -> None:
    """``torch.compile(fullgraph=True)`` (AOT autograd, no inductor code generation) sees the kernels as one op
    and gives eager's output and gradients."""
    connector = cmoe.CMoEConnector(cmoe.CMoEConfig(in_features=12, out_features=10, num_experts=4, top_k=2,
                                                   expert=expert, backend="triton", check_finite=False,
                                                   load_balance_coef=0.01)).to(DEVICE)
    assert_compiled_step_matches_eager(connector, torch.randn(2, 20, 12, device=DEVICE))


@pytest.mark.parametrize("block_m", [16, 32])
def test_alignment_sorts_stably_and_pads_each_expert_to_the_block(block_m: int) -> None:
    index = torch.tensor([[2, 0], [0, 2], [2, 1], [0, 2], [2, 0]] * 7, device=DEVICE)  # expert 3 gets nothing
    al = align(index, num_experts=4, block_m=block_m)
    pairs = al.sorted_pair.cpu()
    flat = index.reshape(-1).cpu()
    real = pairs[pairs < al.num_pairs]
    assert sorted(real.tolist()) == list(range(index.numel()))  # every pair exactly once
    experts_in_order = flat[real.long()]
    assert torch.equal(experts_in_order, experts_in_order.sort(stable=True).values)
    for e in range(4):  # stable: pairs of one expert in increasing id order
        ids = real[experts_in_order == e]
        assert torch.equal(ids, ids.sort().values)
    counts = torch.bincount(flat, minlength=4)
    blocks = (counts + block_m - 1) // block_m
    assert al.block_offsets.cpu().tolist() == [0, *torch.cumsum(blocks, 0).tolist()]
    block_expert = al.block_expert.cpu()
    for b in range(al.num_blocks):  # every block holds one expert's pairs (or padding) only
        rows = pairs[b * block_m:(b + 1) * block_m]
        rows = rows[rows < al.num_pairs]
        if block_expert[b] < 0:
            assert rows.numel() == 0
        else:
            assert set(flat[rows.long()].tolist()) <= {int(block_expert[b])}
    assert (block_expert >= 0).sum() == blocks.sum()


def test_connector_trains_with_backend_triton_like_sorted() -> None:
    losses = {}
    for backend in ("triton", "sorted"):
        torch.manual_seed(0)
        connector = cmoe.CMoEConnector(cmoe.CMoEConfig(in_features=12, out_features=10, num_experts=4, top_k=2,
                                                       backend=backend)).to(DEVICE)
        optimizer = torch.optim.AdamW(connector.parameters(), lr=1e-2)
        x = torch.randn(4, 6, 12, device=DEVICE)
        target = torch.randn(4, 6, 10, device=DEVICE)
        history = []
        for _ in range(6):
            out = connector(x)
            loss = torch.nn.functional.mse_loss(out.hidden_states, target) + out.aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(loss.item())
        losses[backend] = history
    assert losses["triton"][-1] < losses["triton"][0]
    assert losses["triton"] == pytest.approx(losses["sorted"], rel=1e-4)


def test_dense_routing_takes_the_wide_gemm_path_and_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    import cmoe.dispatch

    calls = []
    wide_gemm = cmoe.dispatch.dense_backend
    monkeypatch.setattr(cmoe.dispatch, "dense_backend", lambda *args: calls.append(1) or wide_gemm(*args))
    experts = cmoe.MLPExperts(3, 8, 6).to(DEVICE)
    x = torch.randn(5, 8, device=DEVICE)
    scores, index = torch.randn(5, 3, device=DEVICE).topk(3)
    weight = scores.softmax(-1)
    fast = triton_moe_project(x, experts, index, weight)
    assert calls == [1]
    triton_moe_project(x[:, :8], experts, index[:, :2], weight[:, :2])  # k < E: the fused kernels
    assert calls == [1]
    ref = cmoe.moe_project(x, experts, index, weight, backend="loop")
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)


def test_auto_never_picks_triton_on_cpu() -> None:
    from cmoe.auto import candidates

    assert "triton" in cmoe.BACKENDS and cmoe.BACKENDS.get("triton").is_available("cpu")  # the interpreter
    names, _ = candidates(torch.randn(3, 4), cmoe.LinearExperts(4, 4, 3), top_k=2)
    assert "triton" not in names and "sorted" in names
    assert cmoe.select_backend(torch.randn(3, 4), num_experts=4, top_k=2) == "sorted"  # the table rule


def test_unsupported_inputs_raise_clear_errors() -> None:
    x = torch.randn(3, 4, device=DEVICE)
    with pytest.raises(CMoEError, match="at most 64 experts"):
        triton_moe_project(x, cmoe.LinearExperts(65, 4, 3).to(DEVICE), torch.zeros(3, 1, dtype=torch.long,
                           device=DEVICE), torch.ones(3, 1, device=DEVICE))
    with pytest.raises(CMoEError, match="expected x in float32, bfloat16, float16 or float64"):
        triton_moe_project(x.to(torch.complex64), cmoe.LinearExperts(2, 4, 3).to(DEVICE),
                           torch.zeros(3, 1, dtype=torch.long, device=DEVICE), torch.ones(3, 1, device=DEVICE))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error message")
def test_explicit_triton_on_cpu_without_interpreter_says_why() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import torch, cmoe\n"
            "cmoe.moe_project(torch.randn(3, 4), cmoe.LinearExperts(2, 4, 3), torch.zeros(3, 1, dtype=torch.long),"
            " torch.ones(3, 1), backend='triton')\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "backend 'triton' cannot run on device cpu: the fused kernels need a CUDA GPU" in result.stderr
    assert "TRITON_INTERPRET=1" in result.stderr


@pytest.mark.parametrize("stage_rows", [0, 1], ids=["plain", "staged"])
@pytest.mark.parametrize("a_gather", [True, False], ids=["gathered", "padded"])
@pytest.mark.parametrize("splits", [1, 3], ids=["stored", "split-atomic"])
def test_weight_grad_kernel_matches_per_expert_sums(a_gather: bool, splits: int, stage_rows: int) -> None:
    """Both output paths of the weight-gradient kernel (one split stored in the weight dtype, several added into
    fp32) give ``dW[e] = Σ dYᵀ·A`` and ``db[e] = Σ dY`` over expert e's rows, with an expert that has none, with
    and without the hand-staged gather (``stage_rows``; the split-atomic case gives splits of one block and of
    several, so the staged loop runs once and more than once)."""
    from cmoe.kernels import pin_config
    from cmoe.kernels.ops import weight_grad

    gen = torch.Generator().manual_seed(splits)
    tokens, top_k, experts, n, k = 37, 2, 4, 19, 23
    index = torch.stack([torch.randperm(3, generator=gen)[:top_k] for _ in range(tokens)]).to(DEVICE)  # 3 unused
    al = align(index, num_experts=experts, block_m=16)
    x = torch.randn(tokens, k, generator=gen).to(DEVICE)
    token = torch.clamp(al.sorted_pair.long() // top_k, max=tokens - 1)
    real = (al.sorted_pair < al.num_pairs).unsqueeze(1)
    a = x if a_gather else torch.where(real, x.index_select(0, token), 0.0)
    dy = torch.where(real, torch.randn(al.padded_rows, n, generator=gen).to(DEVICE), 0.0)
    pin_config("weight_grad", stage_rows=stage_rows)
    try:
        dw, db = weight_grad(al, dy, a, a_gather=a_gather, num_experts=experts, has_bias=True, splits=splits)
    finally:
        pin_config("weight_grad")
    assert dw.dtype == x.dtype and dw.shape == (experts, n, k)
    rows_x = x.index_select(0, token) * real
    for e in range(experts):
        lo, hi = (int(v) * 16 for v in al.block_offsets[e:e + 2])
        torch.testing.assert_close(dw[e], dy[lo:hi].t() @ rows_x[lo:hi], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(db[e], dy[lo:hi].sum(0), rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(dw[3]) == 0 and torch.count_nonzero(db[3]) == 0


def test_backward_does_not_materialise_grads_for_the_saved_activations() -> None:
    """The forward op also returns the alignment and the padded activations (saved for backward, never used by
    the caller). Autograd must not build zero gradients for them: each would be a ``[padded rows, hidden]``
    buffer alive through the backward (it raised the fwd+bwd peak on the H100)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZerosRecorder(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.shapes: list[tuple[int, ...]] = []
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            self.ops.add(str(func.overloadpacket))
            if func.overloadpacket in (torch.ops.aten.zeros, torch.ops.aten.zeros_like, torch.ops.aten.new_zeros,
                                       torch.ops.aten.full, torch.ops.aten.full_like, torch.ops.aten.fill_):
                self.shapes.append(tuple(out.shape))
            return out

    experts = cmoe.MLPExperts(4, 12, 10, hidden_features=24).to(DEVICE)
    x = torch.randn(30, 12, device=DEVICE, requires_grad=True)
    scores, index = torch.randn(30, 4, device=DEVICE).topk(2, dim=-1)
    weight = scores.softmax(-1).requires_grad_()
    out = triton_moe_project(x, experts, index, weight)
    with ZerosRecorder() as recorder:
        out.sum().backward()
    assert x.grad is not None and weight.grad is not None
    assert "cmoe.triton_moe_backward" in recorder.ops  # the recorder saw the backward
    hidden_like = [shape for shape in recorder.shapes if len(shape) == 2 and shape[1] == 24]  # [rows, hidden]
    assert not hidden_like, f"zero tensors shaped like the padded activations were made in backward: {hidden_like}"


def test_a_loss_on_the_saved_activations_alone_sends_no_gradient() -> None:
    """With zero gradients not materialised, a backward that reaches the op through its saved outputs only (not
    y) gets ``grad_out = None`` and must answer with no gradients rather than fail."""
    experts = cmoe.MLPExperts(3, 6, 5, hidden_features=7).to(DEVICE)
    x = torch.randn(9, 6, device=DEVICE, requires_grad=True)
    index = torch.randint(0, 3, (9, 1), device=DEVICE)
    weight = torch.rand(9, 1, device=DEVICE, requires_grad=True)
    (w1, b1), (w2, b2) = experts.layers
    outputs = torch.ops.cmoe.triton_moe_forward(x, index, weight, [w1, w2], [b1, b2], [True, True], "gelu", 16, True)
    hidden = outputs[4][0]
    hidden.sum().backward()
    assert x.grad is None and weight.grad is None
