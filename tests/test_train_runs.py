"""A training run resumes only under the spec it was started with."""
import pytest

from cluster.errors import UserError
from cluster.store import Store
from jobs.train.config import TrainConfig
from jobs.train.losses import LossConfig
from jobs.train.run import SPEC_FILE, claim_run
from jobs.train.spec import WorkerSpec


def spec(alpha: float = 0.5) -> WorkerSpec:
    return WorkerSpec(student="student", teacher="teacher", loss=LossConfig(alpha=alpha), train=TrainConfig(),
                      data="shakespeare")


def test_the_same_spec_resumes_and_another_is_refused_naming_what_changed(tmp_path):
    store = Store(str(tmp_path))
    claim_run(spec(), "run", store)
    (tmp_path / "runs" / "run" / "checkpoint_1").mkdir()  # as Ray Train leaves a run it can resume
    claim_run(spec(), "run", store)  # a rerun of the same job resumes
    assert (tmp_path / "runs" / "run" / "checkpoint_1").is_dir()
    with pytest.raises(UserError, match=r"other settings \(loss\.alpha\).*force: true"):
        claim_run(spec(alpha=1.0), "run", store)
    assert (tmp_path / "runs" / "run" / "checkpoint_1").is_dir()  # nothing deleted


def test_fresh_starts_again_and_a_run_of_unknown_settings_is_refused(tmp_path):
    store = Store(str(tmp_path))
    old = tmp_path / "runs" / "old"
    (old / "checkpoint_1").mkdir(parents=True)  # a run that did not record its spec
    with pytest.raises(UserError, match="unknown settings"):
        claim_run(spec(), "old", store)
    claim_run(spec(alpha=1.0), "old", store, fresh=True)
    assert not (old / "checkpoint_1").exists() and (old / SPEC_FILE).is_file()
    claim_run(spec(alpha=1.0), "old", store)
