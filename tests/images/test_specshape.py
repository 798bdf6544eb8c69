"""A bundle's config.json (or containerd's) whose parts have the wrong JSON type is refused by the host,
naming the part, before anything reads it: `{"process": "x"}` crashed `pykata run` with an
AttributeError, `"mounts": "x"` and `"linux": []` too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pykata.errors import InvalidArgument
from pykata.images import ImageStore
from pykata.images.errors import ImageError
from pykata.images.specshape import check_spec_shape

BAD = [
    ({"process": "x"}, "config.json.process: must be an object"),
    ({"process": {"args": "true"}}, "config.json.process.args: must be a list of strings"),
    ({"process": {"args": ["true"], "env": "A=1"}}, "config.json.process.env: must be a list of strings"),
    ({"root": {"path": 5}}, "config.json.root.path: must be a string"),
    ({"mounts": "x"}, "config.json.mounts: must be a list of objects"),
    ({"mounts": [{"destination": "/a"}, {"destination": 5}]}, "config.json.mounts[1].destination: must be a string"),
    ({"mounts": [{"destination": "/a", "options": [1]}]}, "config.json.mounts[0].options: must be a list of strings"),
    ({"linux": []}, "config.json.linux: must be an object"),
    ({"linux": {"resources": 5}}, "config.json.linux.resources: must be an object"),
    ({"annotations": {"a": 1}}, "config.json.annotations: must be an object of strings"),
    ([], "config.json: must be a JSON object"),
    # 4294967295 is (uid_t)-1: setresuid(-1, -1, -1) changes nothing and the process would stay root
    ({"process": {"user": {"uid": 4294967295, "gid": 0}}}, "config.json.process.user.uid: 4294967295 is not an "
     "integer in [0, 2147483647] (runc's range; 4294967295 is -1: setresuid would keep root)"),
    ({"process": {"user": {"uid": 0, "gid": -1}}}, "config.json.process.user.gid: -1 is not an integer in "
     "[0, 2147483647] (runc's range; 4294967295 is -1: setresuid would keep root)"),
    ({"process": {"user": {"uid": 0, "additionalGids": [0, 4294967295]}}}, "config.json.process.user."
     "additionalGids[1]: 4294967295 is not an integer in [0, 2147483647] (runc's range; 4294967295 is -1: "
     "setresuid would keep root)"),
]


@pytest.mark.parametrize("spec,message", BAD)
def test_a_part_of_the_wrong_type_is_named(spec: object, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        check_spec_shape(spec)
    assert str(info.value) == message


def test_a_well_formed_spec_passes_as_is() -> None:
    spec = {"ociVersion": "1.0.2", "process": {"args": ["sh"], "env": ["A=1"], "cwd": "/", "user": {"uid": 0}},
            "root": {"path": "rootfs"}, "mounts": [{"destination": "/proc", "type": "proc", "source": "proc"}],
            "linux": {"resources": {"memory": {"limit": 1}}, "namespaces": [{"type": "pid"}]}}
    assert check_spec_shape(spec) is spec


@pytest.mark.parametrize("spec,message", [b for b in BAD if isinstance(b[0], dict)][:4])
def test_a_bundle_with_a_malformed_config_is_an_image_error(tmp_path: Path, spec: object, message: str) -> None:
    (tmp_path / "b" / "rootfs").mkdir(parents=True)
    (tmp_path / "b" / "config.json").write_text(json.dumps(spec))
    with pytest.raises(ImageError, match=message.replace("[", r"\[").replace(".", r"\.")):
        ImageStore(tmp_path / "cache").resolve(str(tmp_path / "b"))
