"""Every YAML file in configs/ validates against its settings class, and bad settings fail by name."""

from __future__ import annotations

from pathlib import Path

import pytest

from ovis_batch.config import CaptionConfig, ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def settings_class(path: Path):
    """The settings class of a config file, by the command it configures (the file name's first word)."""
    command = path.stem.split("-")[0]
    if command == "caption":
        return CaptionConfig
    if command == "index":
        from ovis_batch.index.settings import IndexSettings

        return IndexSettings
    if command == "finetune":
        from ovis_batch.train.settings import FinetuneConfig

        return FinetuneConfig
    if command == "bench":
        from ovis_batch.bench.settings import BenchConfig

        return BenchConfig
    if command == "evaluate":
        pytest.skip(f"{path.name}: validated by its own command's tests")
    raise AssertionError(f"{path.name}: no settings class is known for it; add it to settings_class()")


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cls = settings_class(path)
    if cls is CaptionConfig:
        load_config(CaptionConfig, path)
    else:
        import yaml

        cls(**(yaml.safe_load(path.read_text()) or {}))


def test_caption_yaml_documents_the_defaults():
    assert load_config(CaptionConfig, CONFIGS / "caption.yaml") == CaptionConfig()


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("max_new_token: 12\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*max_new_token: Extra inputs are not permitted"):
        load_config(CaptionConfig, bad)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("max_new_tokens=0", "max_new_tokens: Input should be greater than or equal to 1"),
        ("embedding=mean", "embedding: Input should be 'last_token' or 'vte_mean'"),
        ("thinking_budget=100", "thinking_budget is set but thinking is false"),
        ("min_pixels=4000000", r"min_pixels \(4000000\) must not exceed max_pixels"),
        ("passthrough_columns=[caption]", r"clash with output columns"),
        ("replicas=two", "replicas: Input should be a valid integer"),
    ],
)
def test_impossible_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CaptionConfig, None, [override])


def test_max_new_tokens_must_exceed_the_thinking_budget():
    with pytest.raises(ConfigError, match=r"max_new_tokens \(100\) must exceed thinking_budget \(100\)"):
        load_config(CaptionConfig, None, ["thinking=true", "thinking_budget=100", "max_new_tokens=100"])
    # The room the forced end of thinking needs is the checkpoint tokenizer's to say: the job's pre-flight
    # checks it (tests/pipeline/test_preflight.py), the settings alone cannot.
    ok = load_config(CaptionConfig, None, ["thinking=true", "thinking_budget=100", "max_new_tokens=101"])
    assert ok.thinking_budget == 100


def test_a_stall_timeout_shorter_than_the_report_is_refused():
    with pytest.raises(ConfigError, match=r"stall_timeout_s \(60\) is shorter than stall_report_s \(600\)"):
        load_config(CaptionConfig, None, ["stall_timeout_s=60"])
    assert load_config(CaptionConfig, None, ["stall_timeout_s=null"]).stall_timeout_s is None


def test_overrides_parse_as_yaml_values(tmp_path):
    config = load_config(
        CaptionConfig, None, ["thinking=true", "top_k=5", "embedding=null", "prompt=Say: hi"]
    )
    assert config.thinking is True and config.top_k == 5 and config.embedding is None
    assert config.prompt == "Say: hi"
    with pytest.raises(ConfigError, match="not key=value"):
        load_config(CaptionConfig, None, ["thinking"])
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(CaptionConfig, missing)


def test_bench_suite_refuses_what_the_caption_job_would_and_what_bench_sets(tmp_path):
    from ovis_batch.bench.settings import BenchConfig

    suite = load_config(BenchConfig, CONFIGS / "bench.yaml")
    thinking = {b.name: b.settings.get("thinking", False) for b in suite.benchmarks}
    assert thinking["MMBench_DEV_EN"] and thinking["HallusionBench"] and not thinking["POPE"]
    cases = {
        "benchmarks:\n  - {name: X, file: x.tsv, scorng: pope}\n": r"benchmarks\.0\.scorng: Extra inputs",
        "benchmarks:\n  - {name: X, file: x.tsv, settings: {thinking_budget: 9}}\n": r"benchmark 'X'.*thinking_budget is set",
        "settings: {prompt_column: q}\nbenchmarks:\n  - {name: X, file: x.tsv}\n": r"\['prompt_column'\] are set by bench",
        "benchmarks:\n  - {name: X, file: a.tsv}\n  - {name: X, file: b.tsv}\n": r"names must be unique; repeated: \['X'\]",
        "benchmarks:\n  - {name: 'a b', file: a.tsv}\n": r"benchmarks\.0\.name: 'a b': use letters",
        "benchmarks: []\n": r"benchmarks: List should have at least 1 item",
    }
    for text, message in cases.items():
        bad = tmp_path / "bench.yaml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_config(BenchConfig, bad)
