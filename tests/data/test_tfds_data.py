"""TFDS (ArrayRecord) training data: episode planning, builder round trip via tfds.data_source + grain, per-host
sharding, resumable iterators, precompute with tiny converted VAE/T5, bad data, and a tiny overfit through the
real launcher on precomputed TFDS data."""

import json
import os
import subprocess
import zlib
import sys

import ml_dtypes
import numpy as np
import pytest

from ttt_dit.data import episodes, precompute, tfds_builder

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_episodes as te  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
T, HL, WL, C2, LT, D = 3, 4, 6, 32, 6, 32     # tiny_3s: latent frames, latent h/w, 2*16 channels, L_t, T5 width


def fake_encode(sample):
  """Deterministic arrays per sample id (for builder/reader tests that do not need the models)."""
  rng = np.random.default_rng(zlib.crc32(sample.id.encode()))
  n = len(sample.parts)
  return (rng.normal(size=(2 * n + 1, HL, WL, C2)).astype(np.float32),
          rng.normal(size=(n, LT, D)).astype(np.float32))


def fake_samples(count: int, n: int = 1):
  return [episodes.Sample(f"ep/{i:05d}", "ep", tuple((i, j) for j in range(n)), ("t",) * n) for i in range(count)]


def build_fake(tmp_path, count: int, dtype="float32", n: int = 1):
  samples = fake_samples(count, n)
  stage = {1: "3s", 3: "9s"}[n]
  tfds_builder.build(str(tmp_path), stage, samples, fake_encode, (2 * n + 1, HL, WL, C2), (n, LT, D), dtype=dtype)
  return tfds_builder.dataset_dir(str(tmp_path), stage), {s.id: fake_encode(s) for s in samples}


def test_plan_samples_scene_tokens_and_remainder(tmp_path):
  clips = [episodes.Clip("c0", "ep0", "a.mp4", tuple(episodes.storyboard.Scene(t, f) for t, f in
                                                     [("a", True), ("b", True), ("c", False)])),
           episodes.Clip("c1", "ep0", "b.mp4", (episodes.storyboard.Scene("d", True),)),
           episodes.Clip("c2", "ep1", "c.mp4", (episodes.storyboard.Scene("e", False),))]
  s3 = episodes.plan_samples(clips, 3)
  assert [s.id for s in s3] == ["ep0/00000"]             # ep0: 4 segments -> one 9 s sample + 1 dropped
  assert s3[0].parts == ((0, 0), (0, 1), (0, 2))
  assert s3[0].texts == ("a<end_scene>", "<start_scene>b", "c")   # first segment: no start token
  s1 = episodes.plan_samples(clips, 1)
  assert [s.texts for s in s1] == [("a",), ("b",), ("c",), ("d",), ("e",)]  # 3 s samples: no tokens
  assert [s.parts for s in episodes.plan_samples(clips, 2)] == [((0, 0), (0, 1)), ((0, 2), (1, 0))]


def test_builder_round_trip_data_source_and_grain(tmp_path):
  path, want = build_fake(tmp_path / "f32", 5)
  src = tfds_builder.data_source(path)
  assert len(src) == 5
  got = {src[i]["id"].decode(): src[i] for i in range(5)}
  assert sorted(got) == sorted(want)
  for sid, (m, t) in want.items():
    np.testing.assert_array_equal(got[sid]["moments"], m)
    np.testing.assert_array_equal(got[sid]["text"], t)
  ds = tfds_builder.TfdsLatentDataset(path, T, 1, shard_index=0, shard_count=1)
  it = iter(ds.loader(global_batch=2, seed=3))
  for step in range(4):                                   # grain DataLoader == step-derived batches
    bm, bt = next(it)
    m, t = ds.batch(step, 2, seed=3)
    np.testing.assert_array_equal(bm, m)
    np.testing.assert_array_equal(bt, t)
    assert m.shape == (2, T, HL, WL, C2) and t.shape == (2, 1, LT, D)
  # bfloat16 storage (the official dtype): values are the bf16 rounding of the encoder output
  path16, want16 = build_fake(tmp_path / "bf16", 2, dtype="bfloat16")
  src16 = tfds_builder.data_source(path16)
  for i in range(2):
    r = src16[i]
    assert r["moments"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(r["moments"], want16[r["id"].decode()][0].astype(ml_dtypes.bfloat16))


def test_sharding_two_hosts_cover_every_sample_once(tmp_path):
  path, want = build_fake(tmp_path, 6)
  src = tfds_builder.data_source(path)
  ids = [src[i]["id"].decode() for i in range(6)]
  hosts = [tfds_builder.TfdsLatentDataset(path, T, 1, shard_index=p, shard_count=2) for p in range(2)]
  epoch = []  # one epoch = 6 records / 2 hosts = 3 records each = 3 steps of global batch 2 (1 row per host)
  for p, h in enumerate(hosts):
    seen = [ids[i] for step in range(3) for i in h.host_indices(step, 2, seed=0)]
    assert len(set(seen)) == 3
    epoch += seen
  assert sorted(epoch) == sorted(want)                      # every sample exactly once across the hosts
  # each host's local batch is its slice of the global batch; the grain loader per host agrees
  for step in range(4):
    g = hosts[0].batch(step, 2, seed=0)[0]
    for p, h in enumerate(hosts):
      loc = h.local_batch(step, 2, seed=0)[0]
      np.testing.assert_array_equal(loc, g[p:p + 1])
  for p, h in enumerate(hosts):
    it = iter(h.loader(2, seed=0))
    for step in range(4):
      np.testing.assert_array_equal(next(it)[0], h.local_batch(step, 2, seed=0)[0])


def test_resumable_iterator_state(tmp_path):
  path, _ = build_fake(tmp_path, 5)
  ds = tfds_builder.TfdsLatentDataset(path, T, 1, shard_index=0, shard_count=1)
  it = iter(ds.loader(2, seed=1))
  for _ in range(3):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]                       # crosses an epoch boundary (5 records)
  it2 = iter(tfds_builder.TfdsLatentDataset(path, T, 1, shard_index=0, shard_count=1).loader(2, seed=1))
  it2.set_state(state)
  for w in want:
    g = next(it2)
    np.testing.assert_array_equal(g[0], w[0])
    np.testing.assert_array_equal(g[1], w[1])
  json.loads(state)                                         # JSON bytes: checkpointable next to the params
  np.testing.assert_array_equal(ds.batch(3, 2, seed=1)[0], want[0][0])  # == the step-derived position


@pytest.fixture(scope="module")
def precomputed(tmp_path_factory):
  """Tiny VAE/T5 + episodes, then the precompute CLI (subprocess) for 3s and 9s."""
  root = tmp_path_factory.mktemp("pre")
  vae_dir, t5_dir = te.write_models(str(root / "models"))
  ann = te.write_episodes(str(root / "eps"))
  out = str(root / "out")
  r = subprocess.run([sys.executable, "-m", "experiments.precompute", f"--annotations={ann}", f"--vae={vae_dir}",
                      f"--text_encoder={t5_dir}", f"--output_dir={out}", "--stages=3s,9s", "--preset=tiny",
                      f"--segment_frames={te.SEGMENT_FRAMES}", "--dtype=float32", "--official_format"],
                     cwd=REPO, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-4000:]
  return root, ann, vae_dir, t5_dir, out


def test_precompute_equals_direct_encode(precomputed):
  import ttt_dit
  from ttt_dit.vae.cogvideox_vae import load_vae
  root, ann, vae_dir, t5_dir, out = precomputed
  assert sorted(os.listdir(root)) == ["eps", "models", "out"]          # the temp dir was renamed, none left
  with open(os.path.join(out, "skipped.json")) as f:
    assert json.load(f) == {"3s": {}, "9s": {}}
  clips = episodes.load_annotations(ann)
  vae = load_vae(vae_dir, dtype=np.float32, sample_window=te.SEGMENT_FRAMES)
  enc = ttt_dit.load_text_encoder(t5_dir, dtype=np.float32)
  for stage, n, count in (("3s", 1, 6), ("9s", 3, 2)):
    src = tfds_builder.data_source(tfds_builder.dataset_dir(out, stage))
    assert len(src) == count
    samples = {s.id: s for s in episodes.plan_samples(clips, n)}
    for i in range(count):
      rec = src[i]
      s = samples[rec["id"].decode()]
      video = episodes.sample_video(s, clips, segment_frames=te.SEGMENT_FRAMES)
      assert video.shape == (te.SEGMENT_FRAMES * n + 1, te.H, te.W, 3)
      mean, logvar = vae.encode(video[None])                # 9-frame window, then 8-frame windows with caches
      np.testing.assert_allclose(rec["moments"], np.concatenate([mean, logvar], -1)[0], rtol=1e-5, atol=1e-5)
      assert rec["moments"].shape == (2 * n + 1, 4, 6, 32)
      np.testing.assert_allclose(rec["text"], enc(enc.tokenize(list(s.texts), LT if n == 1 else 10)),
                                 rtol=1e-5, atol=1e-5)
      assert [t.decode() for t in rec["texts"]] == list(s.texts)
  # the official-layout export holds the same samples (LatentDataset: the official-format reader)
  from ttt_dit.data.latents import LatentDataset
  for stage, n in (("3s", 1), ("9s", 3)):
    off = LatentDataset(os.path.join(out, "official", stage, "index.jsonl"), 2 * n + 1, n)
    src = tfds_builder.data_source(tfds_builder.dataset_dir(out, stage))
    assert [e["id"] for e in off.entries] == [src[i]["id"].decode() for i in range(len(src))]
    for i in range(len(src)):
      np.testing.assert_array_equal(off.samples[i][0], src[i]["moments"])
      np.testing.assert_array_equal(off.samples[i][1], src[i]["text"])
  # the 9 s sample of ep0 crosses the annotated scene cut inside clip c0
  nine = {src9["id"].decode(): src9 for src9 in tfds_builder.data_source(tfds_builder.dataset_dir(out, "9s"))}
  assert [t.decode() for t in nine["ep0/00000"]["texts"]] == [
      "tom chases jerry<end_scene>", "<start_scene>jerry eats cheese", "the dog runs in the park"]


class FakeVAE:
  cfg = {"latent_channels": 16}
  spatial_scale = 8

  def encode(self, video):
    t = (video.shape[1] - 1) // 4 + 1
    z = np.full((1, t, video.shape[2] // 8, video.shape[3] // 8, 16), float(video.mean()), np.float32)
    return z, z - 12.0


class FakeText:
  def tokenize(self, texts, length):
    return np.zeros((len(texts), length), np.int32)

  def __call__(self, ids):
    return np.ones(ids.shape + (D,), np.float32)


def test_bad_data_reported_by_sample_id_fail_or_skip(tmp_path):
  clips = te.CLIPS + [("c3", "ep2", [("x", False)]), ("c4", "ep3", [("y", False)]),
                      ("c5", "ep4", [("z", False), ("w", False)]), ("c6", "ep5", [("v", False)])]
  # c3: wrong segment length (12 frames); c4: missing file; c5: 1 segment of frames, 2 annotated; c6: corrupt
  ann = te.write_episodes(str(tmp_path / "eps"), clips, frames={"c3": 12, "c5": 9})
  os.remove(str(tmp_path / "eps" / "ep3" / "c4.mp4"))
  with open(str(tmp_path / "eps" / "ep5" / "c6.mp4"), "wb") as f:
    f.write(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 10)
  args = (ann, None, FakeVAE(), FakeText(), ["3s"], {"3s": LT})
  out = str(tmp_path / "out")
  with pytest.raises(episodes.BadSample, match=r"sample ep2/00000: clip c3 .*12 frames is not 8k\+1"):
    precompute.precompute(args[0], out, *args[2:], segment_frames=te.SEGMENT_FRAMES)
  assert not os.path.exists(out) and not [p for p in os.listdir(tmp_path) if p.startswith("out")]  # atomic
  skipped = precompute.precompute(args[0], out, *args[2:], on_error="skip", segment_frames=te.SEGMENT_FRAMES)
  bad = skipped["3s"]
  assert sorted(bad) == ["ep2/00000", "ep3/00000", "ep4/00000", "ep4/00001", "ep5/00000"], bad
  assert "12 frames is not 8k+1" in bad["ep2/00000"]
  assert "missing video file" in bad["ep3/00000"]
  assert "9 frames = 1 segments, but 2 annotated" in bad["ep4/00000"]
  assert "cannot decode video" in bad["ep5/00000"]
  with open(os.path.join(out, "skipped.json")) as f:
    assert json.load(f) == skipped                                       # counted, not silently dropped
  assert len(tfds_builder.data_source(tfds_builder.dataset_dir(out, "3s"))) == 6   # the good samples
  with pytest.raises(ValueError, match="exists"):
    precompute.precompute(args[0], out, *args[2:], segment_frames=te.SEGMENT_FRAMES)


def test_reader_bad_records_fail_or_skip(tmp_path):
  path, _ = build_fake(tmp_path, 3)
  with pytest.raises(episodes.BadSample, match=r"sample ep/0000\d: moments \(3, 4, 6, 32\), expected \[T=5"):
    tfds_builder.TfdsLatentDataset(path, 5, 1, shard_index=0, shard_count=1).batch(0, 2)
  # a corrupt file: every record unreadable -> each named and counted when skipping, then a clear error
  shard = [f for f in os.listdir(path) if ".array_record-" in f][0]
  with open(os.path.join(path, shard), "r+b") as f:
    size = f.seek(0, 2)
    f.seek(size // 3)
    f.write(b"\xff" * (size // 3))
  ds = tfds_builder.TfdsLatentDataset(path, T, 1, shard_index=0, shard_count=1)
  with pytest.raises(episodes.BadSample, match="corrupt record"):
    ds.batch(0, 2)
  skip = tfds_builder.TfdsLatentDataset(path, T, 1, on_error="skip", shard_index=0, shard_count=1)
  with pytest.raises(ValueError, match="no usable records"):
    skip.batch(0, 2)
  assert sorted(skip.skipped) == ["record 0", "record 1", "record 2"]


def test_tiny_overfits_on_precomputed_tfds_through_launcher(precomputed, tmp_path):
  sys.path.insert(0, os.path.join(REPO, "tests", "train"))
  from runs import BASE, launch, losses  # the launcher tests' overrides: shared compiled step
  _, _, _, _, out = precomputed
  run = str(tmp_path / "run")
  launch(run, "", *BASE, "--config.data.source=tfds", f"--config.data.tfds_dir={tfds_builder.dataset_dir(out, '3s')}",
         "--config.checkpoint.every=40", "--config.ttt_diagnostics_every=0")
  l = losses(run)
  assert sorted(l) == list(range(40))
  first, last = np.mean([l[s] for s in range(5)]), np.mean([l[s] for s in range(35, 40)])
  assert last < 0.6 * first, (first, last)  # stated factor: mean loss drops by >= 40% in 40 steps (6 samples)
