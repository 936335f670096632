"""converters.common: snapshots (single / sharded), rule tables, transforms, error aggregation, atomic output."""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from converters import common
from converters.common import Rule

RULES = (
    Rule(r"blocks\.(?P<i>\d+)\.lin\.weight", "layers.{i}.lin.kernel", "transpose"),
    Rule(r"blocks\.(?P<i>\d+)\.lin\.bias", "layers.{i}.lin.bias"),
    Rule(r"conv\.weight", "embed.kernel", "conv2d_to_dense"),
)
EXPECTED = {"layers.0.lin.kernel": (3, 2), "layers.0.lin.bias": (2,), "layers.1.lin.kernel": (3, 2),
            "layers.1.lin.bias": (2,), "embed.kernel": (16, 5)}


def _tensors():
  rng = np.random.default_rng(0)
  return {"blocks.0.lin.weight": rng.standard_normal((2, 3)).astype(np.float32),
          "blocks.0.lin.bias": rng.standard_normal(2).astype(np.float32),
          "blocks.1.lin.weight": rng.standard_normal((2, 3)).astype(ml_dtypes.bfloat16),
          "blocks.1.lin.bias": rng.standard_normal(2).astype(np.float32),
          "conv.weight": rng.standard_normal((5, 4, 2, 2)).astype(np.float32)}


def _write_sharded(folder, tensors, shards):
  os.makedirs(folder)
  weight_map = {}
  for s, keys in enumerate(shards):
    name = f"part-{s}-of-{len(shards)}.safetensors"
    save_file({k: tensors[k] for k in keys}, os.path.join(folder, name))
    weight_map.update({k: name for k in keys})
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_single_and_sharded_snapshots_convert_identically(tmp_path):
  t = _tensors()
  os.makedirs(tmp_path / "single")
  save_file(t, str(tmp_path / "single" / "w.safetensors"))
  keys = sorted(t)
  _write_sharded(str(tmp_path / "sharded"), t, [keys[:2], keys[2:4], keys[4:]])
  outs = [common.convert_snapshot(common.SafetensorsSnapshot(str(tmp_path / k)), RULES, EXPECTED, "float32")
          for k in ("single", "sharded")]
  for out in outs:
    assert set(out) == set(EXPECTED) and all(out[k].shape == EXPECTED[k] for k in out)
    np.testing.assert_array_equal(out["layers.0.lin.kernel"], t["blocks.0.lin.weight"].T)
    np.testing.assert_array_equal(out["layers.1.lin.kernel"], t["blocks.1.lin.weight"].astype(np.float32).T)
    np.testing.assert_array_equal(out["embed.kernel"], t["conv.weight"].reshape(5, 16).T)
    assert out["layers.1.lin.kernel"].dtype == np.float32
  bf = common.convert_snapshot(common.SafetensorsSnapshot(str(tmp_path / "single")), RULES, EXPECTED, "bfloat16")
  assert bf["embed.kernel"].dtype == ml_dtypes.bfloat16
  # The inverse transforms restore the PyTorch layout exactly.
  np.testing.assert_array_equal(common.invert_transform("conv2d_to_dense", outs[0]["embed.kernel"], (5, 4, 2, 2)),
                                t["conv.weight"])


def test_all_problems_in_one_error(tmp_path):
  t = _tensors()
  t["blocks.0.lin.wieght"] = t.pop("blocks.0.lin.weight")  # renamed
  t["blocks.1.lin.bias"] = np.zeros(3, np.float32)  # wrong shape
  t["extra"] = np.zeros(1, np.float32)  # unknown
  os.makedirs(tmp_path / "s")
  save_file(t, str(tmp_path / "s" / "w.safetensors"))
  with pytest.raises(ValueError) as e:
    common.plan_conversion(common.SafetensorsSnapshot(str(tmp_path / "s")), RULES, EXPECTED)
  msg = str(e.value)
  for needle in ("2 unknown tensors", "blocks.0.lin.wieght", "extra", "1 missing tensors", "layers.0.lin.kernel (expected source blocks.0.lin.weight)",
                 "blocks.1.lin.bias -> layers.1.lin.bias: expected (2,), got (3,)"):
    assert needle in msg, msg
  # Ignorable keys are dropped silently.
  with pytest.raises(ValueError) as e:
    common.plan_conversion(common.SafetensorsSnapshot(str(tmp_path / "s")), RULES, EXPECTED, ignore=[r"extra"])
  assert "1 unknown tensors" in str(e.value)


def test_broken_shards_are_named(tmp_path):
  t = _tensors()
  keys = sorted(t)
  _write_sharded(str(tmp_path / "a"), t, [keys[:3], keys[3:]])
  os.remove(tmp_path / "a" / "part-1-of-2.safetensors")
  with pytest.raises(ValueError, match=r"missing: \['part-1-of-2.safetensors'\]"):
    common.SafetensorsSnapshot(str(tmp_path / "a"))
  _write_sharded(str(tmp_path / "b"), t, [keys[:3], keys[3:]])
  path = tmp_path / "b" / "part-0-of-2.safetensors"
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 8)
  with pytest.raises(ValueError, match=r"part-0-of-2.safetensors: truncated file: .*blocks\.1\.lin\.bias"):
    common.SafetensorsSnapshot(str(tmp_path / "b"))
  os.makedirs(tmp_path / "c")
  save_file(t, str(tmp_path / "c" / "x.safetensors"))
  save_file(t, str(tmp_path / "c" / "y.safetensors"))
  with pytest.raises(ValueError, match="expected one .safetensors file or an index json"):
    common.SafetensorsSnapshot(str(tmp_path / "c"))


def test_atomic_directory(tmp_path):
  dst = str(tmp_path / "out")
  with pytest.raises(RuntimeError):
    with common.atomic_directory(dst) as tmp:
      open(os.path.join(tmp, "partial"), "w").close()
      raise RuntimeError("interrupted")
  assert os.listdir(tmp_path) == []  # nothing left behind
  with common.atomic_directory(dst) as tmp:
    common.save_orbax(os.path.join(tmp, "ckpt"), common.unflatten({"a.b": np.arange(3.0), "a.c": np.ones(2)}))
  assert os.listdir(tmp_path) == ["out"]
  restored = common.flatten(common.load_orbax(os.path.join(dst, "ckpt")))
  np.testing.assert_array_equal(restored["a.b"], np.arange(3.0))
  with pytest.raises(ValueError, match="already exists"):
    with common.atomic_directory(dst):
      pass
  with pytest.raises(ValueError, match="unknown dtype"):
    common.parse_dtype("fp8")
