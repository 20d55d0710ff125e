"""The paper's Table 4 (FID, aesthetic, CLIP score, HPS of the base and the adapted model) as a markdown table.

CLIP score and HPS are image-text cosines. The paper's Table 4 prints both as cosines (CLIP score 0.2816, HPS
0.1898 for the adapted model); HPS as a score elsewhere is 100 · cos and CLIP score is usually quoted x100, so the
table gives both scales, labelled: `(cos)` the mean cosine, `(×100)` exactly 100 times it. The CLIP score clamps
each image's cosine at 0 before the mean (`hps_jax.metrics.scores.clip_score`); HPS is the raw mean.
"""

from __future__ import annotations

# (results key, sub-key or None, column header); nested ones are `hps_jax.metrics.compute.cosine_scales` dicts
TABLE_COLUMNS = (
  ("fid", None, "FID ↓"),
  ("aesthetic_mean", None, "Aesthetic ↑"),
  ("clip", "cosine", "CLIP score (cos) ↑"),
  ("clip", "x100", "CLIP score (×100) ↑"),
  ("hps", "cosine", "HPS (cos) ↑"),
  ("hps", "x100", "HPS (×100) ↑"),
)
GENERATOR_METRICS = ("fid", "aesthetic", "clip", "hps")


def _value(r: dict, key: str, sub: str | None):
  v = r.get(key)
  return v.get(sub) if sub is not None and isinstance(v, dict) else (v if sub is None else None)


def _images(r: dict) -> str:
  n, skipped = r.get("num_generated"), r.get("skipped", 0)
  if n is None:
    return "–"
  return f"{n - skipped} of {n}" if skipped else str(n)


def markdown_table(results: dict, settings: dict | None = None) -> str:
  """| model | images | FID | Aesthetic | CLIP score (cos) | CLIP score (×100) | HPS (cos) | HPS (×100) |, a row
  for each evaluated model (absent metrics as '–', metrics not computed for any model left out); under it, what the
  scales mean and, with `settings` (eval-generator's JSON "settings"), how the images were made."""
  cols = [c for c in TABLE_COLUMNS if any(_value(r, c[0], c[1]) is not None for r in results.values())]
  lines = [
    "| model | images | " + " | ".join(name for _, _, name in cols) + " |",
    "|---" * (len(cols) + 2) + "|",
  ]
  for model, r in results.items():
    cells = [_images(r)]
    for key, sub, _ in cols:
      v = _value(r, key, sub)
      cells.append("–" if v is None else f"{v:.4g}")
    lines.append(f"| {model} | " + " | ".join(cells) + " |")
  notes = ["", "images: the number each model's metrics were computed on (generated, less unreadable ones)."]
  if any(c[0] == "clip" for c in cols):
    notes.append(
      "CLIP score (cos): mean over images of max(cos(image, prompt), 0) — clamped at 0 per image; (×100) = 100 · (cos)."
    )
  if any(c[0] == "hps" for c in cols):
    notes.append("HPS (cos): mean cos(image, prompt) under the HPS model, not clamped; (×100) = 100 · (cos).")
  if settings:
    notes += ["", _settings_line(settings)]
  return "\n".join(lines + notes) + "\n"


def _settings_line(s: dict) -> str:
  """The generation and measurement settings of an eval-generator run, in one paragraph."""
  parts = [
    f"{s.get('num_prompts')} prompts × {s.get('num_images')} images per model",
    f"sampler {s.get('scheduler')}, {s.get('steps')} steps, guidance {s.get('guidance')}",
    f"{s.get('width')}×{s.get('height')} px",
    f"seed {s.get('seed')} (image k of prompt j: seed + j·{s.get('num_images')} + k)",
    f"negative prompt: base {s.get('base_negative_prompt', '')!r}"
    + (f", adapted {s.get('negative_prompt', '')!r}" if s.get("lora") else ""),
  ]
  ckpts = [
    ("model", s.get("model")),
    ("LoRA", s.get("lora") and f"{s['lora']} (scale {s.get('lora_scale')})"),
    ("CLIP", s.get("clip_checkpoint")),
    ("aesthetic head", s.get("aesthetic_mlp")),
    ("HPS", s.get("hps_checkpoint")),
    ("FID reference", s.get("reference_stats")),
    ("Inception", s.get("inception_weights")),
  ]
  parts.append("checkpoints: " + ", ".join(f"{k} {v}" for k, v in ckpts if v))
  if s.get("resize"):
    parts.append(f"FID resize {s['resize']}")
  return "Settings: " + "; ".join(parts) + "."
