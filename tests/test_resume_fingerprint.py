"""Resume compatibility: what makes a resume exact is recorded; a change is refused with every difference in words,
unless --ignore_resume_mismatch, and then the run is told it is no longer exact."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.errors import UserError
from engine.resume_fingerprint import ResumeFingerprint, check_resume, differences, fingerprint_examples

EXAMPLES = [{"input_ids": [1, 2, 3], "completion_mask": [0, 1, 1], "index": 0},
            {"input_ids": [4, 5], "completion_mask": [0, 1], "index": 1}]
CONFIG = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, max_length=1024, seed=42,
                         data_seed=None, group_by_length=False, optim="adamw_torch_fused")
CHECKPOINT = Path("out/checkpoint-10")


def _fingerprint(examples=EXAMPLES, num_processes=1, **changes) -> ResumeFingerprint:
    return ResumeFingerprint.of_run(examples, SimpleNamespace(**{**vars(CONFIG), **changes}), num_processes)


def test_the_same_run_resumes_exactly_through_a_json_round_trip():
    saved = ResumeFingerprint.from_dict(json.loads(json.dumps(_fingerprint().to_dict())))  # as trainer_state.json
    assert saved == _fingerprint()
    assert differences(saved, _fingerprint()) == []
    assert check_resume(CHECKPOINT, saved, _fingerprint(), ignore_mismatch=False) is None


def test_the_data_fingerprint_sees_one_changed_token_and_the_order():
    changed = [{**EXAMPLES[0], "input_ids": [1, 2, 4]}, EXAMPLES[1]]
    assert fingerprint_examples(changed) != fingerprint_examples(EXAMPLES)
    assert fingerprint_examples(EXAMPLES[::-1]) != fingerprint_examples(EXAMPLES)
    assert differences(_fingerprint(), _fingerprint(changed)) == [
        "the prepared training data changed (same number of examples, different content)"]
    assert differences(_fingerprint(), _fingerprint(EXAMPLES[:1])) == [
        "the prepared training data changed (2 examples then, 1 now)"]


def test_a_changed_layout_is_refused_with_every_difference():
    current = _fingerprint(num_processes=2, per_device_train_batch_size=2, max_length=512)
    with pytest.raises(UserError) as caught:
        check_resume(CHECKPOINT, _fingerprint(), current, ignore_mismatch=False)
    assert str(caught.value) == (
        "--resume_from_checkpoint out/checkpoint-10: this run would not continue it exactly: "
        "--per_device_train_batch_size was 4, now 2; the number of processes was 1, now 2; --max_length was 1024, "
        "now 512; restore the original settings, or pass --ignore_resume_mismatch to continue anyway (no longer "
        "an exact resume)")


def test_asked_to_continue_anyway_the_run_says_it_is_no_longer_exact():
    note = check_resume(CHECKPOINT, _fingerprint(), _fingerprint(gradient_accumulation_steps=4, seed=7),
                        ignore_mismatch=True)
    assert note == (
        "resuming from out/checkpoint-10 with changes (--gradient_accumulation_steps was 2, now 4; --seed was 42, "
        "now 7), as --ignore_resume_mismatch asks: this run is NOT an exact continuation (data order, batches and "
        "metrics differ from an uninterrupted run)")


def test_a_checkpoint_without_fingerprint_cannot_be_checked_and_says_so():
    assert ResumeFingerprint.from_dict(None) is None
    assert check_resume(CHECKPOINT, None, _fingerprint(), ignore_mismatch=False) == (
        "out/checkpoint-10 records no resume fingerprint (written by an older nanopost): cannot check that this "
        "resume is exact")


def test_a_changed_data_order_is_refused():
    """--data_seed and --group_by_length decide the order of the micro-batches (engine/data_order.py), so a resume
    that changes either replays other batches than the uninterrupted run: both are named."""
    assert differences(_fingerprint(), _fingerprint(data_seed=7, group_by_length=True)) == [
        "--data_seed was None, now 7", "--group_by_length was False, now True"]


def test_a_checkpoint_from_before_the_order_settings_were_kept_reads_as_their_defaults():
    """A fingerprint saved without data_seed / group_by_length / optim (older checkpoints) reads as None / False /
    None: what those runs used for the order, since the flags did not change it then; an unrecorded optimizer is
    not compared."""
    saved = {k: v for k, v in _fingerprint().to_dict().items() if k not in ("data_seed", "group_by_length", "optim")}
    assert ResumeFingerprint.from_dict(saved) == _fingerprint(optim=None)
    assert differences(ResumeFingerprint.from_dict(saved), _fingerprint()) == []  # an unrecorded --optim: not checked


def test_another_optimizer_is_refused():
    """The checkpoint holds the state of its optimizer (AdamW's moments, SGD's momentum): loaded into another one it
    would be wrong or silently dropped, so a resume with another --optim is named like a changed batch size."""
    assert differences(_fingerprint(), _fingerprint(optim="sgd")) == ["--optim was adamw_torch_fused, now sgd"]
