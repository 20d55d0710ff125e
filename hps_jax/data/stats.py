"""Statistics of a preference dataset (the numbers of the paper's Sec. 3): prompts by image count, images, users and
choices per user, prompt lengths in words and characters.

Pure Python / numpy over records of the shared schema (`hps_jax.data.pipeline`: "prompt", "images", "chosen",
"ranks"; optionally "user"): each record is one prompt and one human choice. Users are counted only when records
name their user (the TFDS builders keep HPD v1's user_hash, Pick-a-Pic's user_id and a JSONL's `user`; HPD v2 and
the synthetic set have none: their users are "not recorded").
"""

from __future__ import annotations

from collections import Counter
from typing import Iterable

import numpy as np

PERCENTILES = (5, 25, 75, 95)


def _distribution(values) -> dict:
  """mean, median, min, max and the PERCENTILES of a list of numbers (all None for an empty list)."""
  a = np.asarray(values, np.float64)
  keys = ["mean", "median", "min", "max"] + [f"p{q}" for q in PERCENTILES]
  if a.size == 0:
    return dict.fromkeys(keys)
  out = {"mean": float(a.mean()), "median": float(np.median(a)), "min": float(a.min()), "max": float(a.max())}
  out.update({f"p{q}": float(np.percentile(a, q)) for q in PERCENTILES})
  return out


class DatasetStats:
  """Accumulates records (`add`); `summary()` is the JSON-able report. The raw per-record values stay available
  for histograms: `images_per_prompt`, `prompt_words`, `prompt_chars`, `choices` (user -> number of choices)."""

  def __init__(self):
    self.images_per_prompt: list[int] = []
    self.prompt_words: list[int] = []
    self.prompt_chars: list[int] = []
    self.prompts: set[str] = set()
    self.choices: Counter = Counter()
    self.without_user = 0

  def add(self, record: dict) -> None:
    prompt = str(record["prompt"])
    self.images_per_prompt.append(len(record["images"]))
    self.prompt_words.append(len(prompt.split()))
    self.prompt_chars.append(len(prompt))
    self.prompts.add(prompt)
    user = record.get("user")
    if user is None or user == "":
      self.without_user += 1
    else:
      self.choices[str(user)] += 1

  def users(self) -> dict | str:
    """The users' part of the summary; "not recorded" when no record names its user."""
    if not self.choices:
      return "not recorded"
    per_user = list(self.choices.values())
    return {
      "users": len(self.choices),
      "records_without_user": self.without_user,
      "choices_per_user": {
        **_distribution(per_user),
        "max": max(per_user),
        "min": min(per_user),
        "distribution": {str(k): v for k, v in sorted(Counter(per_user).items())},
      },
    }

  def summary(self) -> dict:
    by_n = Counter(self.images_per_prompt)
    return {
      "prompts": len(self.images_per_prompt),
      "distinct_prompts": len(self.prompts),
      "images": int(sum(self.images_per_prompt)),
      "prompts_by_images": {str(n): by_n[n] for n in sorted(by_n)},
      "users": self.users(),
      "prompt_words": _distribution(self.prompt_words),
      "prompt_chars": _distribution(self.prompt_chars),
    }


def dataset_stats(records: Iterable[dict]) -> DatasetStats:
  """The statistics of every record (a DatasetStats; `.summary()` for the report)."""
  stats = DatasetStats()
  for record in records:
    stats.add(record)
  return stats


def _num(x) -> str:
  if x is None:
    return "-"
  if isinstance(x, float) and not x.is_integer():
    return f"{x:,.2f}"
  return f"{int(x):,}"


def markdown(summary: dict, title: str = "dataset") -> str:
  """The summary as markdown tables: counts, then prompt lengths (words / characters)."""
  lines = [f"### {title}", "", "| statistic | value |", "|---|---|"]
  lines.append(f"| prompts | {_num(summary['prompts'])} |")
  for n, count in summary["prompts_by_images"].items():
    lines.append(f"| prompts with {n} images | {_num(count)} |")
  lines.append(f"| distinct prompts | {_num(summary['distinct_prompts'])} |")
  lines.append(f"| images | {_num(summary['images'])} |")
  users = summary["users"]
  if isinstance(users, str):
    lines.append(f"| users | {users} |")
  else:
    per = users["choices_per_user"]
    lines.append(f"| users | {_num(users['users'])} |")
    lines.append(f"| choices per user (max / median / mean) | {_num(per['max'])} / {_num(per['median'])} / "
                 f"{_num(per['mean'])} |")  # fmt: skip
    if users["records_without_user"]:
      lines.append(f"| choices without a user | {_num(users['records_without_user'])} |")
  keys = ["mean", "median", "min", "max"] + [f"p{q}" for q in PERCENTILES]
  lines += ["", "| prompt length | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
  for name in ("words", "chars"):
    d = summary[f"prompt_{name}"]
    lines.append(f"| {name} | " + " | ".join(_num(d[k]) for k in keys) + " |")
  return "\n".join(lines) + "\n"
