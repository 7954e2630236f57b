"""Fuzzing config overrides: any override either validates or fails with ConfigError (never a
crash of another kind), and whatever validates round-trips through the saved YAML."""

from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vlp.train.config import ConfigError, dump_config, load_config

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"

KEYS = [
    "name", "seed", "output_dir", "train.steps", "train.batch_size", "train.lr", "train.warmup_steps",
    "train.betas", "train.weight_decay", "deepspeed.zero_stage", "deepspeed.precision", "deepspeed.extra",
    "model.embed_dim", "model.image.width", "model.image.type", "model.image.embed_dim", "model.text.layers",
    "model.heads.clip.weight", "model.heads.siglip", "model.heads.meru.curv_init", "data.train.0.urls",
    "data.train.0.weight", "data.workers", "data.mode", "evals.0.type", "evals.0.every", "export",
    "train.stepz", "model.heads.nope", "data.train.5.urls", "train.steps.deeper",
]
VALUES = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "null", "true", "[]", "{}", "[1, 2]", "{a: 1}", "fp8", "bf16", "zeroshot", "../x",
                     "!!python/object/apply:os.system ['true']", "'$(touch /tmp/x)'", "a\nb", "{", "]"]),
    st.text(max_size=12),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(KEYS), VALUES), max_size=4))
def test_any_override_validates_or_raises_config_error(pairs):
    overrides = [f"{key}={value}" for key, value in pairs]
    try:
        config = load_config(DEMO, overrides)
    except ConfigError as error:
        assert str(error).strip(), "a config error must say what is wrong"
        return
    assert load_config(tree=__import__("yaml").safe_load(dump_config(config))) == config
