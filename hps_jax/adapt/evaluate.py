"""The paper's Table 4 (FID, aesthetic, CLIP score, HPS of the base and the adapted model) as a markdown table."""

from __future__ import annotations

TABLE_COLUMNS = (
  ("fid", "FID ↓"),
  ("aesthetic_mean", "Aesthetic ↑"),
  ("clip_score", "CLIP score ↑"),
  ("hps_mean", "HPS ↑"),
)
GENERATOR_METRICS = ("fid", "aesthetic", "clip", "hps")


def markdown_table(results: dict) -> str:
  """| model | FID | Aesthetic | CLIP score | HPS | rows for each evaluated model (absent metrics as '–')."""
  cols = [(k, name) for k, name in TABLE_COLUMNS if any(k in r for r in results.values())]
  lines = ["| model | " + " | ".join(n for _, n in cols) + " |", "|---" * (len(cols) + 1) + "|"]
  for model, r in results.items():
    cells = [f"{r[k]:.4g}" if k in r else "–" for k, _ in cols]
    lines.append(f"| {model} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"
