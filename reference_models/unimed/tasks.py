"""Uni-Med's six tasks: identifier tokens, instruction templates and whether they take an image."""

from __future__ import annotations

from dataclasses import dataclass

from cmoe.errors import UnknownNameError


@dataclass(frozen=True)
class Task:
    """One task: its name, the identifier token that starts its instruction, and its instruction template.

    ``template`` is formatted with the sample's fields (``{question}``, ``{object}``, ``{box}``, ``{classes}``).
    """

    name: str
    identifier: str
    template: str
    has_image: bool = True

    def instruction(self, **fields: str) -> str:
        """The identifier followed by the filled-in template, e.g. ``[vqa] Based on the image, ...``."""
        try:
            text = self.template.format(**fields)
        except KeyError as exc:
            raise KeyError(f"task {self.name!r}: instruction template needs field {exc.args[0]!r}; "
                           f"template is {self.template!r}") from None
        return f"{self.identifier} {text}"


TASKS: dict[str, Task] = {task.name: task for task in (
    Task("qa", "[qa]", "If you are a doctor, please answer the following question briefly: {question}",
         has_image=False),
    Task("vqa", "[vqa]", "Based on the image, respond to this question with a short answer: {question}"),
    Task("report", "[caption]", "{question}"),
    Task("rec", "[refer]", "give me the location of {object}"),
    Task("reg", "[identify]", "what object is in this location {box}"),
    Task("cls", "[cls]", "{question}"),
)}


def get_task(name: str) -> Task:
    """The task called `name` (``qa``, ``vqa``, ``report``, ``rec``, ``reg``, ``cls``)."""
    if name not in TASKS:
        raise UnknownNameError("task", name, sorted(TASKS))
    return TASKS[name]
