"""The wheel installs `cadenza` and nothing else (no generic top-level modules), and
declares compatible version ranges (no exact pins) so it installs into existing
environments."""

import pathlib
import subprocess
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_wheel_holds_only_the_cadenza_package(tmp_path):
    subprocess.run([str(ROOT / ".uv" / "bin" / "uv"), "build", "--wheel", "--quiet",
                    "--out-dir", str(tmp_path), str(ROOT)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("cadenza-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"cadenza", wheel.name.split("-py3")[0] + ".dist-info"}, tops
    for sub in ("models", "train", "decode", "pallas_kernels"):
        assert f"cadenza/{sub}/__init__.py" in names
    assert "cadenza/configs/models/tiny.yaml" in names
    assert "cadenza/configs/experiments/tiny_pretrain.yaml" in names
    assert not any(n.startswith("cadenza/tests/") for n in names)
    metadata = zipfile.ZipFile(wheel).read(
        f"{wheel.name.split('-py3')[0]}.dist-info/METADATA").decode()
    requires = [line.split(":", 1)[1].split(";")[0].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:")]
    assert requires and not [r for r in requires if "==" in r], requires
    assert all(">=" in r and "<" in r.replace("<=", "") for r in requires), requires
    assert "Requires-Python: <3.14,>=3.12" in metadata
