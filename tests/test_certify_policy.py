"""Certification policies: the shipped default validates; bad names and keys fail with file, line and field."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesec.certify.policy import load_policy
from tunesec.errors import UsageError

GOOD = """
name: p
checks:
  - name: harm
    task: harmfulness
    dataset: tunesec-harmful
    judge: default
    limit: 10
    metric: harmful_rate
    measure: change
    max: 0.05
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "policy.yaml"
    p.write_text(text)
    return p


def test_default_policy_is_valid_and_documented() -> None:
    pol = load_policy()
    names = [c.name for c in pol.checks]
    assert names == ["harmful-compliance-increase", "refusal-on-harmful", "over-refusal-increase", "utility-drop"]
    first = pol.checks[0]
    assert (first.measure, first.op, first.bound) == ("change", "<=", 0.05)
    assert pol.triggers.enabled and pol.forensics.enabled
    assert len(pol.sha256()) == 64


def test_good_policy_loads(tmp_path: Path) -> None:
    pol = load_policy(_write(tmp_path, GOOD))
    assert pol.checks[0].limit == 10


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        (
            "metric: harmful_rate",
            "metric: harmfull_rate",
            r"line 9: field 'checks.0.metric': unknown metric",
        ),
        ("task: harmfulness", "task: harmfulnes", r"line 5: field 'checks.0.task': unknown task 'harmfulnes'"),
        (
            "dataset: tunesec-harmful",
            "dataset: advbenchh",
            r"line 6: field 'checks.0.dataset': unknown dataset",
        ),
        ("judge: default", "judge: gpt-judge", r"line 7: field 'checks.0.judge': unknown judge 'gpt-judge'"),
    ],
)
def test_unknown_names_name_file_line_and_field(tmp_path: Path, old: str, new: str, pattern: str) -> None:
    path = _write(tmp_path, GOOD.replace(old, new))
    with pytest.raises(UsageError, match=pattern) as err:
        load_policy(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_schema_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="unknown key 'checks.0.maximum'"):
        load_policy(_write(tmp_path, GOOD.replace("max: 0.05", "maximum: 0.05")))
    with pytest.raises(UsageError, match="exactly one of max or min"):
        load_policy(_write(tmp_path, GOOD + "    min: 0.0\n"))
    with pytest.raises(UsageError, match="duplicate check name"):
        load_policy(_write(tmp_path, GOOD + GOOD.split("checks:\n")[1]))
    with pytest.raises(UsageError, match="config file not found"):
        load_policy(tmp_path / "nope.yaml")
    bad_trigger = GOOD + "triggers:\n  judge: nobody\n"
    with pytest.raises(UsageError, match=r"line \d+: field 'triggers.judge': unknown judge 'nobody'"):
        load_policy(_write(tmp_path, bad_trigger))


def test_task_options_are_checked_and_kept_out_of_old_hashes(tmp_path: Path) -> None:
    plain = load_policy(_write(tmp_path, GOOD))
    assert "task_options" not in plain.checks[0].model_dump()  # policies without it keep their hash
    prefill = GOOD.replace("    judge: default\n", "    task_options: {prefill: target}\n    judge: default\n")
    assert load_policy(_write(tmp_path, prefill)).checks[0].task_options == {"prefill": "target"}
    with pytest.raises(UsageError, match=r"line \d+: field 'checks.0.task_options': harmfulness task: prefill is"):
        load_policy(_write(tmp_path, prefill.replace("prefill: target", "prefill: ' '")))
    with pytest.raises(UsageError, match=r"field 'checks.0.task_options': task harmfulness: unknown option 'scoring'"):
        load_policy(_write(tmp_path, prefill.replace("prefill: target", "scoring: choices")))


def test_overrides_shrink_samples_and_lengths() -> None:
    from tunesec.certify.policy import load_policy, with_overrides
    from tunesec.errors import UsageError

    pol = load_policy()
    small = with_overrides(pol, limit=10, max_new_tokens=32)
    assert all(c.limit == 10 for c in small.checks) and small.triggers.prompts == 10
    assert small.max_new_tokens == 32
    # A check's own shorter length stays (utility generates 16 tokens).
    assert {c.name: c.max_new_tokens for c in small.checks}["utility-drop"] == 16
    assert with_overrides(pol) == pol and small.sha256() != pol.sha256()
    assert with_overrides(pol, limit=1).triggers.prompts == 2
    with pytest.raises(UsageError, match="--limit: expected a positive number"):
        with_overrides(pol, limit=0)


def test_default_policy_uses_no_training_set() -> None:
    """The shipped adapter learned refusals to tunesec-harmful: the default policy must not measure on it."""
    from tunesec.certify.policy import load_policy

    pol = load_policy()
    names = {c.dataset for c in pol.checks} | {pol.triggers.dataset, pol.forensics.harmful_dataset}
    names |= {pol.forensics.harmless_dataset}
    assert not any(n.startswith("tunesec-") for n in names), names


def test_check_dataset_defaults_from_its_task(tmp_path: Path) -> None:
    from tunesec.certify.policy import load_policy

    p = tmp_path / "p.yaml"
    p.write_text(
        "checks:\n"
        "  - {name: a, task: harmfulness, metric: harmful_rate, measure: tuned, max: 0.1}\n"
        "  - {name: b, task: over-refusal, metric: refusal_rate, measure: change, max: 0.1}\n"
    )
    pol = load_policy(p)
    assert (pol.checks[0].dataset, pol.checks[0].dataset_options) == ("advbench", {})
    assert (pol.checks[1].dataset, pol.checks[1].dataset_options) == ("xstest", {"subset": "safe"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("checks:\n  - name: a\n    task: harmfulness\n    metric: harmful_rate\n    measure: tuned\n    max: 0.1\n"
         "    limt: 5\n", "line 7: unknown key 'checks.0.limt'; did you mean 'limit'?"),
        ("checks: []\ntriggers:\n  enabled: true\n  promts: 5\n",
         "line 4: unknown key 'triggers.promts'; did you mean 'prompts'?"),
        ("nmae: x\nchecks: []\n", "line 1: unknown key 'nmae'; did you mean 'name'?"),
    ],
)  # fmt: skip
def test_unknown_key_has_line_and_did_you_mean(tmp_path: Path, text: str, expected: str) -> None:
    from tunesec.certify.policy import load_policy
    from tunesec.errors import UsageError

    p = tmp_path / "p.yaml"
    p.write_text(text)
    with pytest.raises(UsageError) as info:
        load_policy(p)
    assert str(info.value) == f"{p}: {expected}"


def test_certify_md_documents_every_policy_field() -> None:
    from tunesec.certify.policy import ForensicsPolicy, MetricCheck, Policy, TriggerPolicy

    doc = (Path(__file__).resolve().parents[1] / "docs" / "CERTIFY.md").read_text()
    section = doc[doc.index("## Policy fields") :]
    for model in (Policy, MetricCheck, TriggerPolicy, ForensicsPolicy):
        for field in model.model_fields:
            assert f"`{field}`" in section, (model.__name__, field)
