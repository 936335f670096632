"""Where a Mosaic GPU kernel's register spills sit: a summary of its SASS dump.

`MOSAIC_GPU_DUMP_SASS=1` prints each compiled kernel's SASS (through nvdisasm, which the device
image had on 2026-12-08; NOTES-ttt-mlp.md says how to carry one in where it does not). This reads such a log and, per kernel, prints the
instruction stream condensed into segments between landmarks (wgmma groups, MUFU math, barriers,
mbarrier waits, shuffles, TMA, branches), each with its local-memory traffic (STL / LDL: spills),
so the spills can be placed in a phase of the step before a change is guessed. Loops (a branch
back to a lower address) are listed first with their spill traffic: the step loops.

  python -m benchmarks.sass_summary LOG [--kernel SUBSTRING] [--all]
"""

from __future__ import annotations

import argparse
import collections
import gzip
import re

# instruction (opcode prefix) -> landmark class; everything else is "other"
LANDMARKS = (("HGMMA", "wgmma"), ("WARPGROUP.ARRIVE", "wg_arrive"), ("WARPGROUP.DEPBAR", "wg_wait"),
             ("MUFU.TANH", "tanh"), ("MUFU.RSQ", "rsqrt"), ("MUFU.RCP", "rcp"), ("MUFU.EX2", "exp"),
             ("BAR.", "bar"), ("SYNCS.", "mbarrier"), ("SHFL", "shfl"), ("UTMALDG", "tma_load"),
             ("UTMASTG", "tma_store"), ("UBLKCP", "bulk_copy"), ("STL", "STL"), ("LDL", "LDL"),
             ("STS", "STS"), ("LDS", "LDS"), ("STSM", "STS"), ("LDSM", "LDS"), ("ST.", "ST"),
             ("BRA", "branch"), ("MEMBAR", "membar"), ("FENCE", "fence"), ("UCGABAR", "cluster_bar"))
_INSN = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
_FUNC = re.compile(r"\.text\.([\w$.]+):|Function : ([\w$.]+)")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_TARGET = re.compile(r"BRA\s+`?\((\.L_x_\d+)\)")


def classify(opcode: str) -> str:
  """The landmark class of an opcode (longest matching prefix), or "other"."""
  best = ("", "other")
  for prefix, cls in LANDMARKS:
    if opcode.startswith(prefix) and len(prefix) > len(best[0]):
      best = (prefix, cls)
  return best[1]


def parse(lines, loops_out: dict | None = None) -> dict[str, list[tuple[int, str, str]]]:
  """{kernel name: [(address, opcode, class), ...]} from SASS text lines; with `loops_out`, also
  {kernel name: [(first, last) address of each loop]} there: a branch to a lower address before
  the kernel's first EXIT closes a loop that starts at its target (the step loops; after the EXIT
  come the out-of-line mbarrier wait retries, which jump back into the body)."""
  kernels: dict[str, list] = {}
  labels: dict[str, int] = {}
  branches: list[tuple[int, str]] = []
  pending: list[str] = []
  cur = name = None

  def close():
    if loops_out is not None and name is not None:
      end = min([a for a, op, _ in cur if op == "EXIT"], default=float("inf"))
      loops_out[name] = sorted((labels[t], a) for a, t in branches if t in labels
                               and labels[t] < a < end)

  for line in lines:
    m = _FUNC.search(line)
    if m:
      close()
      name = f"{m.group(1) or m.group(2)}#{len(kernels)}"
      cur = kernels.setdefault(name, [])
      labels, branches, pending = {}, [], []
      continue
    m = _LABEL.match(line.strip())
    if m:
      pending.append(m.group(1))
      continue
    m = _INSN.search(line)
    if m and cur is not None:
      op, addr = m.group(3), int(m.group(1), 16)
      labels.update((lab, addr) for lab in pending)
      pending = []
      cur.append((addr, op, classify(op)))
      t = _TARGET.search(line)
      if t:
        branches.append((addr, t.group(1)))
  close()
  return kernels


def segments(insns, breaks=("wgmma", "tanh", "rsqrt", "bar", "mbarrier", "branch", "tma_load",
                            "tma_store", "cluster_bar")):
  """Runs of instructions between landmark classes in `breaks`; each segment: (first address,
  landmark that opens it, Counter of classes inside)."""
  segs, cur = [], None
  for addr, _, cls in insns:
    if cls in breaks and (cur is None or cur[1] != cls or cur[2].get("other", 0) > 0):
      cur = (addr, cls, collections.Counter())
      segs.append(cur)
    if cur is None:
      cur = (addr, "start", collections.Counter())
      segs.append(cur)
    cur[2][cls] += 1
  return segs


def summarize(insns, show_all: bool = False) -> list[str]:
  """Printable lines: totals, then segments (all, or those with spills)."""
  total = collections.Counter(c for _, _, c in insns)
  out = [f"  {len(insns)} instructions; " + ", ".join(
      f"{k} {total[k]}" for k in ("STL", "LDL", "wgmma", "tanh", "rsqrt", "bar", "mbarrier", "shfl",
                                  "STS", "LDS", "branch") if total[k])]
  for addr, cls, cnt in segments(insns):
    if show_all or cnt["STL"] or cnt["LDL"]:
      body = " ".join(f"{k}:{v}" for k, v in sorted(cnt.items()) if k != "other")
      out.append(f"  {addr:#07x} {cls:>10s} | other:{cnt['other']:4d} {body}")
  return out


def loop_report(insns, loops, min_len: int = 64) -> list[str]:
  """Printable lines: per loop of at least `min_len` instructions, its size and spill traffic."""
  out = []
  for first, last in loops:
    body = [c for a, _, c in insns if first <= a <= last]
    if len(body) >= min_len:
      cnt = collections.Counter(body)
      out.append(f"  loop {first:#07x}-{last:#07x}: {len(body)} instructions, STL {cnt['STL']}, "
                 f"LDL {cnt['LDL']}, wgmma {cnt['wgmma']}, bar {cnt['bar']}, "
                 f"mbarrier {cnt['mbarrier']}")
  return out


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("log", help="a SASS dump (text or .gz)")
  p.add_argument("--kernel", default="", help="only kernels whose name contains this")
  p.add_argument("--all", action="store_true", help="every segment, not only those with spills")
  a = p.parse_args(argv)
  opener = gzip.open if a.log.endswith(".gz") else open
  loops: dict = {}
  with opener(a.log, "rt", errors="replace") as f:
    kernels = parse(f, loops)
  for name, insns in kernels.items():
    if a.kernel in name and insns:
      print("\n".join([name] + loop_report(insns, loops.get(name, []))
                      + summarize(insns, a.all)))


if __name__ == "__main__":
  main()
