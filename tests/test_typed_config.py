"""The config is typed from the registries at import: unknown names fail at load with the key
path and the nearest valid name; no model field is `Any`."""

import typing

import pytest
from conftest import DEMO_CONFIG

from vlp.core.errors import ConfigError
from vlp.models.config import ModelConfig
from vlp.models.heads import HEADS
from vlp.models.towers import IMAGE_TOWERS
from vlp.train.config import ExperimentConfig, load_config


@pytest.mark.parametrize("override, message", [
    ("data.build=digitz", 'data.build: unknown data source \'digitz\'; registered: .* Did you mean "digits"\\?'),
    ("evals.0.build=shapez", 'evals.0.build: unknown data source \'shapez\'.* Did you mean "shapes"\\?'),
    ("evals.0.type=zeroshott", 'evals.0: Input tag \'zeroshott\'.* Did you mean "zeroshot"\\?'),
    ("export=[open_clipp]", 'export.0: .*\\(got \'open_clipp\'\\). Did you mean "open_clip"\\?'),
    ("model.image.type=open_clip_vitt", 'model.image: Input tag .* Did you mean "open_clip_vit"\\?'),
])
def test_unknown_names_fail_at_load_with_the_nearest(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(DEMO_CONFIG, [override])


def test_model_fields_are_typed_from_the_registries():
    fields = ModelConfig.model_fields
    assert all(fields[name].annotation is not typing.Any for name in ("image", "text", "heads"))
    assert set(fields["heads"].annotation.model_fields) == set(HEADS.names())
    union = typing.get_args(fields["image"].annotation)  # pydantic keeps the Union, the discriminator aside
    assert {cls.model_fields["type"].default for cls in union} == set(IMAGE_TOWERS.names())
    assert ExperimentConfig.model_fields["evals"].annotation is not list[typing.Any]
    assert type(load_config(DEMO_CONFIG)) is ExperimentConfig  # one class, no registered subclass
