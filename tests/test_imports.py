"""The core install needs only torch: the library's modules import no optional package."""

import subprocess
import sys

OPTIONAL = ("sacrebleu", "sentencepiece", "datasets", "matplotlib", "tqdm")


def test_core_modules_import_no_optional_package():
    # torch itself may load some of them (torch.hub loads tqdm): count only what latentnlp adds
    code = (
        "import sys\n"
        "import torch\n"
        f"before = {{m for m in {OPTIONAL!r} if m in sys.modules}}\n"
        "import importlib, pkgutil, latentnlp\n"
        "for module in pkgutil.walk_packages(latentnlp.__path__, 'latentnlp.'):\n"
        "    importlib.import_module(module.name)\n"
        "from latentnlp.training import Trainer, evaluate\n"
        f"print(sorted(m for m in {OPTIONAL!r} if m in sys.modules and m not in before))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_training_package_exports_every_lazily_imported_name():
    import latentnlp.training as training

    assert sorted(training.__all__) == sorted(training._HOMES)
    for name in training.__all__:
        assert getattr(training, name) is not None
