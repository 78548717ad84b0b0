"""Reproducible numbers: a student trained twice, in two separate processes, from the same
synthetic set and seed ends with the same weights and the same accuracy."""

import subprocess
import sys

import torch

from tsgd_ray.core.models import build_model

OVERRIDES = [
    "evaluate.labels=soft_kl",  # the online teacher: the student augmentation below is its own
    "evaluate.epochs=4",
    "evaluate.batch_size=8",
    "evaluate.augment.time_reverse=true",
    "evaluate.augment.cutmix=0.3",
    "evaluate.augment.mixup=0.3",
    "evaluate.ema=0.9",
]
SCRIPT = """
import hashlib, sys, torch
from tsgd_ray.config import load_config
from tsgd_ray.core import training
from tsgd_ray.core.models import build_model
from tsgd_ray.settings import input_settings, student_settings
torch.set_num_threads(2)
data = torch.load(sys.argv[1], weights_only=True)
cfg = load_config(None, sys.argv[3:])
teacher = build_model("mini_c3d", 4, (4, 16, 16), 4, 2)
teacher.load_state_dict(data["teacher"])
seed = int(sys.argv[2])
torch.manual_seed(seed)
student = build_model("mini_c3d", 4, (4, 16, 16), 4, 2)
training.train_student(student, teacher, data["x"], data["y"], student_settings(cfg), seed)
accuracy = training.topk_accuracy(training.predict(student, data["test"], input_settings(cfg)), data["test_y"])
weights = hashlib.sha256(b"".join(t.numpy().tobytes() for t in student.state_dict().values())).hexdigest()
print(accuracy, weights)
"""


def test_a_student_trained_in_two_processes_is_the_same_student(tmp_path):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    data = {
        "teacher": build_model("mini_c3d", 4, (4, 16, 16), 4, 2).state_dict(),
        "x": torch.randint(0, 256, (16, 4, 16, 16, 3), generator=g, dtype=torch.uint8),
        "y": torch.arange(16) % 4,
        "test": torch.randint(0, 256, (64, 4, 16, 16, 3), generator=g, dtype=torch.uint8),
        "test_y": torch.arange(64) % 4,
    }
    torch.save(data, tmp_path / "set.pt")

    def train(seed: int) -> str:
        return subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "set.pt"), str(seed), *OVERRIDES],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout.strip()

    first, second, other = train(3), train(3), train(4)
    assert first == second
    assert first.split()[1] != other.split()[1]  # the seed does reach the student
