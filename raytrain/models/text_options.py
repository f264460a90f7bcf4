"""How a family object writes an example's text beyond its answer format: prompt templates per task,
a system prompt (chat families), the answer of an example with no object, and whether a multi-class
query is one example. Plain functions both families call (no implementation inheritance); the
values come from the job's `data.text` section (config.TextOptions) through `family.with_text(...)`,
and checkpoints record them so eval and Serve write prompts the way training did.
"""

from __future__ import annotations

from collections.abc import Mapping

from raytrain import tasks as task_registry

LABEL_SEPARATOR = " ; "  # how a multi-class query lists its labels ("detect cat ; dog", big_vision's)


def prompt_table(prompts: Mapping[str, str] | None) -> tuple[tuple[str, str], ...]:
    """{task: template} -> a sorted tuple (hashable: family objects are cached and shipped to
    workers). ValueError for an unknown task or a template with another placeholder than {query}."""
    out = []
    for task, template in sorted((prompts or {}).items()):
        task_registry.get(task)
        if not isinstance(template, str) or not template.strip():
            raise ValueError(f"prompt template of task {task!r} must be a non-empty string")
        try:
            template.format(query="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"prompt template {template!r} of task {task!r}: only {{query}} may be filled in ({e})") from None
        out.append((task, template))
    return tuple(out)


def prompt_for(table: tuple[tuple[str, str], ...], task: str, query: str, default: str) -> str:
    """The templated prompt of `task` (its {query} filled in), or the family's `default`."""
    for t, template in table:
        if t == task:
            return template.format(query=query)
    return default


def _norm(text: str) -> str:
    t = text.casefold().replace("```json", " ").replace("```", " ").replace("\u2019", "'")
    return " ".join(t.split()).rstrip(" .!")


def is_empty_answer(text: str, answers) -> bool:
    """Whether model text is one of the "nothing found" `answers` (case, whitespace, a code fence
    and a final '.' ignored)."""
    t = _norm(text)
    return any(t == _norm(a) for a in answers)
