"""The scenario-file reference (docs/scenarios.md), generated from the schema's field descriptions.

Regenerate with `python -m kvsim.scenario_docs > docs/scenarios.md`; a test checks the committed page
matches the schema.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from kvsim.scenario import (AttentionVariant, EngineSection, GpuSection, ModelSection, PlanSection, ScenarioFile,
                            SimulationSection, SloSection)
from kvsim.workload.distributions import DISTRIBUTION_NAMES
from kvsim.workload.spec import (ClosedLoopWorkload, GammaArrival, OpenLoopWorkload, PoissonArrival, PromptSegment,
                                 RequestClass, SessionSpec, TraceLengths, TraceWorkload)

SECTIONS: list[tuple[str, type[BaseModel]]] = [
    ("top level", ScenarioFile),
    ("model", ModelSection),
    ("model.variants[]", AttentionVariant),
    ("gpu", GpuSection),
    ("engine", EngineSection),
    ("workload (kind: closed_loop)", ClosedLoopWorkload),
    ("workload (kind: open_loop)", OpenLoopWorkload),
    ("workload.arrival (process: poisson)", PoissonArrival),
    ("workload.arrival (process: gamma)", GammaArrival),
    ("workload.sessions", SessionSpec),
    ("workload.lengths_from_trace", TraceLengths),
    ("workload (kind: trace)", TraceWorkload),
    ("prompt segments (workload.prompt[])", PromptSegment),
    ("request classes (workload.classes[])", RequestClass),
    ("slo", SloSection),
    ("simulation", SimulationSection),
    ("plan", PlanSection),
]

HEADER = """# Scenario file reference

A scenario is one YAML file. Every section rejects unknown keys, so a misspelt setting is an error,
not a silent default. Paths are relative to the scenario file. This page is generated from the
schema (`python -m kvsim.scenario_docs > docs/scenarios.md`).

Distributions (lengths, think times) are a plain number or a mapping with `dist:` one of
{distributions}: `{{dist: uniform, min: 50, max: 300}}` (whole numbers, both ends included),
`{{dist: normal, mean, std, min, max}}` and `{{dist: lognormal, mean, std, min, max}}` (clipped to
[min, max]), `{{dist: exponential, mean}}`, `{{dist: empirical, values: [...], weights: [...]}}`.

Strategies are names or mappings: `contiguous` (reserve `max_model_len`), `contiguous-pow2`,
`contiguous-oracle`, `paged`, `paged+prefix`, `radix`, `radix-lfu`, or for example
`{{name: "Orca (Pow2)", kind: contiguous, reservation: pow2, fit: best}}`,
`{{kind: paged, enable_prefix_caching: true}}`, `{{kind: radix, eviction: lfu, page_size: 16}}`.
"""


def _type_name(annotation: Any) -> str:
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    optional = "None" in text and not text.startswith("Literal")
    if "FixedDistribution" in text:
        return "distribution" + (" or none" if optional else "")
    if "Arrival" in text or "Workload" in text:
        return "mapping"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "mapping"
    for prefix in ("typing.", "kvsim.workload.spec.", "kvsim.scenario.", "pathlib."):
        text = text.replace(prefix, "")
    if text.startswith("Literal["):
        return " or ".join(part.strip(" '") for part in text[len("Literal["):-1].split(","))
    return text.replace("NoneType", "None").replace("Optional[", "").rstrip("]") if "Optional[" in text else \
        text.replace("NoneType", "None")


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return "(see below)" if isinstance(field.default_factory, type) else "[]"
    if field.default is PydanticUndefined or field.default is None:
        return "—"
    if field.default == "":
        return '`""`'
    return f"`{field.default}`"


def render() -> str:
    lines = [HEADER.format(distributions=", ".join(f"`{name}`" for name in DISTRIBUTION_NAMES))]
    for title, model in SECTIONS:
        lines.append(f"## {title}\n")
        doc = (model.__doc__ or "").strip().splitlines()[0]
        lines.append(f"{doc}\n")
        lines.append("| key | type | default | meaning |")
        lines.append("|---|---|---|---|")
        for name, field in model.model_fields.items():
            key = field.alias or name
            description = (field.description or "").replace("|", "\\|").replace("\n", " ")
            kind = _type_name(field.annotation).replace("|", "\\|")
            lines.append(f"| `{key}` | {kind} | {_default(field)} | {description} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")

