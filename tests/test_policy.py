import pytest
from pydantic import ValidationError

from prefect_tensorflow.tasks.checkpoints.policy import CheckpointPolicy


def test_defaults_are_the_estimators():
    policy = CheckpointPolicy()
    assert policy.save_checkpoints_secs == 600
    assert policy.save_checkpoints_steps is None
    assert policy.keep_checkpoint_max == 5
    assert policy.keep_checkpoint_every_n_hours == 10000
    assert policy.save_at_start and policy.save_at_end
    assert policy.async_save is True  # a snapshot in the loop, the files in the background (checkpoint_writer)
    assert policy.checkpoint_name == "model.ckpt"


def test_steps_replace_the_default_seconds():
    policy = CheckpointPolicy(save_checkpoints_steps=50)
    assert policy.save_checkpoints_steps == 50
    assert policy.save_checkpoints_secs is None


def test_both_triggers_rejected():
    with pytest.raises(ValidationError, match="expected one of save_checkpoints_secs or save_checkpoints_steps, received both"):
        CheckpointPolicy(save_checkpoints_secs=10, save_checkpoints_steps=10)


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("save_checkpoints_steps", 0, "expected an integer >= 1, received 0"),
        ("save_checkpoints_steps", -5, "expected an integer >= 1, received -5"),
        ("save_checkpoints_steps", 2.5, "expected an integer >= 1, received 2.5"),
        ("save_checkpoints_secs", 0, "expected a number > 0, received 0"),
        ("save_checkpoints_secs", "soon", "expected a number > 0, received 'soon'"),
        ("keep_checkpoint_max", 0, "expected an integer >= 1 (or None to keep every checkpoint), received 0"),
        ("keep_checkpoint_every_n_hours", -1, "expected a number > 0, received -1"),
        ("checkpoint_name", "../escape", "expected a file name prefix"),
    ],
)
def test_bad_values_say_expected_and_received(field, value, expected):
    with pytest.raises(ValidationError) as info:
        CheckpointPolicy(**{field: value})
    text = str(info.value)
    assert field in text
    assert expected in text


def test_unknown_field_rejected():
    with pytest.raises(ValidationError, match="save_every"):
        CheckpointPolicy(save_every=3)


def test_policy_is_frozen():
    with pytest.raises(ValidationError):
        CheckpointPolicy().keep_checkpoint_max = 3
