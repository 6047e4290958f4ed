"""Import purity: the compression core, the packed formats, the runtime layer (``nn``) and the
kernels stay lean (torch and triton only).

Each module is imported in a fresh interpreter (so this test process's own imports do not matter)
and must not pull in the training / config / model stack.
"""

import json
import os
import subprocess
import sys

import pytest

FORBIDDEN = ("lightning", "hydra", "omegaconf", "transformers")

MODULES = (
    "slim_lightning.core.types",
    "slim_lightning.core.quant",
    "slim_lightning.core.prune",
    "slim_lightning.core.sparsegpt",
    "slim_lightning.core.lowrank",
    "slim_lightning.core.compress",
    "slim_lightning.formats",
    "slim_lightning.formats.bitpack",
    "slim_lightning.formats.nm",
    "slim_lightning.formats.unstructured",
    "slim_lightning.formats.dense",
    "slim_lightning.formats.packed",
    "slim_lightning.nn.functional",
    "slim_lightning.nn.linear",
    "slim_lightning.nn.backend",
    "slim_lightning.nn.embedding",
    "slim_lightning.nn.adapters",
    "slim_lightning.nn",
    "slim_lightning.kernels.reference",
    "slim_lightning.kernels.sparse24",
    "slim_lightning.kernels.ops",
)

# imports the modules one by one and reports, after each, the forbidden packages loaded so far
_SCRIPT = """
import importlib, json, sys
forbidden, modules = json.loads(sys.argv[1])
report = {}
for name in modules:
    importlib.import_module(name)
    report[name] = sorted(
        f for f in forbidden if any(k == f or k.startswith(f + ".") for k in sys.modules)
    )
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def import_report() -> dict[str, list[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, json.dumps([FORBIDDEN, MODULES])],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_no_heavy_stack(import_report, module):
    # cumulative: the first module that shows a forbidden package is the one that imported it
    assert module in import_report
    assert import_report[module] == [], f"importing {module} loaded {import_report[module]}"


def test_checkout_kernels_folder_never_shadows_hub_kernels(tmp_path):
    """From the repository root, ``import kernels`` finds Hugging Face's package when installed
    (here a stand-in later on the path) and an empty namespace otherwise, never our folder."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "__version__ = '0.11.1'\ndef get_kernel(*a, **k):\n    return 'hub'\n"
    )
    probe = (
        "import sys; sys.path.insert(0, ''); import slim_lightning, kernels\n"
        "print(getattr(kernels, '__file__', None))\n"
        "from slim_lightning.kernels import jit\n"  # our kernels stay importable by their name
        "print(jit.__name__)\n"
    )
    without = subprocess.run(
        [sys.executable, "-c", probe], cwd=root, capture_output=True, text=True, timeout=120
    )
    assert without.returncode == 0, without.stderr[-2000:]
    # where the hub package is installed (transformers 5.2x requires it) it wins; else nothing
    installed = subprocess.run(
        [
            sys.executable,
            "-c",
            "import importlib.util as u; s = u.find_spec('kernels'); "
            "print(s.origin if s else None)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout.strip()
    assert installed != str(root / "kernels" / "__init__.py")
    assert without.stdout.split() == [installed, "slim_lightning.kernels.jit"]
    env = {**__import__("os").environ, "PYTHONPATH": str(tmp_path / "site")}
    with_hub = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert with_hub.returncode == 0, with_hub.stderr[-2000:]
    assert with_hub.stdout.split()[0] == str(fake / "__init__.py")


def test_third_party_imports_from_checkout_before_slim_lightning(tmp_path):
    """A notebook started in the checkout imports peft / transformers / bitsandbytes first:
    ``import kernels`` must give Hugging Face's package (or nothing), never our folder."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    probe = (
        "import peft, transformers, kernels\n"
        "print(kernels.__file__)\n"
        "import slim_lightning.kernels.reference as r\n"
        "print(r.__name__)\n"
    )

    def run(code: str) -> str:
        proc = subprocess.run(
            [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stdout

    where, ours = run(probe).split()[-2:]
    assert Path(where).resolve().parent != (root / "kernels").resolve()
    assert ours == "slim_lightning.kernels.reference"
    # no hub package anywhere on the path: `import kernels` is a plain "No module named"
    bare = (
        "import sys; sys.path[:] = [''] + [p for p in sys.path if 'site-packages' not in p]\n"
        "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
        "    print('missing', e.name, 'kernels' in sys.modules)\n"
    )
    assert run(bare).split() == ["missing", "kernels", "False"]
