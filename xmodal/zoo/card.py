"""The ``README.md`` model card of a checkpoint folder, rendered from its ``card.yaml`` content.

The card states only what the run recorded (:class:`~xmodal.callbacks.ExportStudent` fills it in): the recipe,
the teacher, the data, the budget, the evaluation metrics and the licence. A field the run did not record reads
"not recorded"; nothing is filled in from defaults. The Hugging Face metadata block (``library_name``, ``tags``,
``license``) comes from :data:`LIBRARY_NAME`, :data:`TAGS` and the card's ``license``, as
:class:`~xmodal.zoo.hub.HubMixin` declares them to ``huggingface_hub``.
"""

from __future__ import annotations

from typing import Any

LIBRARY_NAME = "xmodal"
TAGS = ["xmodal", "knowledge-distillation"]
NOT_RECORDED = "not recorded"

MODEL_CARD_TEMPLATE = """---
{{ card_data }}
---

# {{ name }}

`{{ class_path }}`, saved by xmodal{% if xmodal_version %} {{ xmodal_version }}{% endif %}\
{% if created %} (exported {{ created }}){% endif %}.

| | |
|---|---|
| Recipe | {{ recipe }} |
| Teacher | {{ teacher }}{% if teacher_sha256 %} (weights sha256 `{{ teacher_sha256 }}`){% endif %} |
| Data | {{ data }} |
| Budget | {{ budget }} |
| Licence | {{ license }} |

## Evaluation

{% if metrics %}Recorded with the weights (by an exported run: the trainer's last logged values):

| metric | value |
|---|---|
{% for key, value in metrics.items() %}| {{ key }} | {{ value }} |
{% endfor %}{% else %}The run recorded no metrics.
{% endif %}
## Use

```python
import xmodal

model = xmodal.create_model("<this folder>")  # or "hf://<owner>/<name>@<revision>", download=True
```

`{{ class_name }}.from_pretrained("<this folder or owner/name>")` loads it too (`huggingface_hub`'s mixin).
Weights: `{{ checkpoint }}`, sha256 `{{ sha256 }}`.
"""


def describe(value: Any) -> str:
    """A card field as one table cell: ``key: value`` pairs joined by ``; ``, lists by ``, ``."""
    if value is None or value == {} or value == []:
        return NOT_RECORDED
    if isinstance(value, dict):
        return "; ".join(f"{key}: {describe(item)}" for key, item in value.items() if item not in (None, {}, []))
    if isinstance(value, list | tuple):
        return ", ".join(describe(item) for item in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_model_card(card: dict[str, Any], template: str = MODEL_CARD_TEMPLATE) -> str:
    """The ``README.md`` text of a checkpoint folder whose ``card.yaml`` holds ``card``."""
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name=LIBRARY_NAME, tags=list(TAGS), license=card.get("license") or None)
    fields = {key: describe(card.get(key)) for key in ("recipe", "teacher", "data", "budget", "license")}
    metrics = {key: describe(value) for key, value in (card.get("metrics") or {}).items()}
    rendered = ModelCard.from_template(
        data, template_str=template, name=card.get("name"), class_path=card.get("class_path"),
        class_name=str(card.get("class_path", "")).rpartition(".")[2], xmodal_version=card.get("xmodal_version"),
        created=card.get("created"), teacher_sha256=card.get("teacher_sha256"), checkpoint=card.get("checkpoint"),
        sha256=card.get("sha256"),
        metrics=metrics, **fields,
    )
    return str(rendered)
