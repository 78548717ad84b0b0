"""The Ray Train glue's cadence: how often a run reports (and checkpoints)."""

from tsgd_ray.runtime.ray_train import LONG_EPOCH_STEPS, report_due


def test_short_epochs_report_ten_times_a_run_and_long_ones_every_epoch():
    short = [e for e in range(300) if report_due(e, 300, steps_per_epoch=8)]
    assert short == list(range(29, 300, 30))  # a report waits for the controller's poll
    assert [e for e in range(7) if report_due(e, 7, 64)] == list(range(7))
    # at least STEPS_PER_REPORT steps apart, and the last
    assert [e for e in range(25) if report_due(e, 25, 8)] == [7, 15, 23, 24]
    assert [e for e in range(240) if report_due(e, 240, 1)] == [63, 127, 191, 239]  # the default's students
    long = [e for e in range(300) if report_due(e, 300, steps_per_epoch=LONG_EPOCH_STEPS)]
    assert long == list(range(300))  # a lost node repeats at most one epoch


def test_a_teacher_group_is_elastic_only_between_a_smaller_minimum_and_its_size():
    from types import SimpleNamespace

    from tsgd_ray.runtime.ray_train import scaling_config

    def workers(least, size=8):
        section = SimpleNamespace(num_workers=size, min_workers=least, cpus_per_worker=1.0, gpus_per_worker=0.0)
        return scaling_config(section, "cpu").num_workers

    assert workers(4) == (4, 8)  # Ray Train restarts it on 4-8 workers
    assert workers(0) == 8 and workers(8) == 8 and workers(12) == 8  # fixed
    assert workers(4, size=1) == 1  # a shipped config's minimum over a one-worker override
