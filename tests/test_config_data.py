"""The data stages' params sections: strict types, frozen values, and each cross-field rule."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

from specauf.config_data import (BaseParams, LabelsParams, LaunchParams, PromptSource, PromptsParams, RolloutsParams,
                                 TargetParams)


@pytest.mark.parametrize("section,values,message", [
    (TargetParams, {"source": "hub"}, "target.hub_id is required when target.source is 'hub'"),
    (PromptsParams, {"min_chars": 50, "max_chars": 10}, "min_chars must be <= max_chars"),
    (PromptsParams, {"eval": {"../up": [PromptSource(source="mtbench", count=1)]}}, "eval set name '../up' must be a plain name"),
    (PromptsParams, {"eval": {".hidden": [PromptSource(source="mtbench", count=1)]}}, "must be a plain name"),
    (LaunchParams, {"launcher": "torchrun", "hostfile": "hosts"}, "hostfile needs launcher: deepspeed"),
    (LabelsParams, {"layer_ids": []}, "layer_ids must be a non-empty list"),
    (LabelsParams, {"layer_ids": [2, -1]}, "non-negative layer ids"),
])
def test_cross_field_rules_name_what_is_wrong(section, values, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(".", r"\.")):
        section(**values)


def test_types_are_strict_and_values_frozen():
    with pytest.raises(ValidationError, match="valid integer"):
        RolloutsParams(batch_size=True)  # `true` is not one sequence per batch
    with pytest.raises(ValidationError, match="valid number"):
        RolloutsParams(temperature="0.7")
    with pytest.raises(ValidationError, match="finite number"):
        RolloutsParams(top_p=float("nan"))
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        BaseParams(threads=2)
    p = LabelsParams()
    with pytest.raises(ValidationError, match="frozen"):
        p.top_k = 3


def test_accepted_values_pass_through_unchanged():
    assert LaunchParams(launcher="deepspeed", hostfile="hosts").hostfile == "hosts"
    assert LabelsParams(layer_ids=[0, 5]).layer_ids == [0, 5]
    assert TargetParams(source="local", path="/models/x").path == "/models/x"
    assert PromptSource(source="jsonl", path="p.jsonl", count=3, id_field=None).id_field is None
