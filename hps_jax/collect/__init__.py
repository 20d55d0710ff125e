"""Building preference data sets from chat logs (the paper's Sec. 3: HPD came from Discord exports of a Stable
Diffusion bot channel). `hps_jax.collect.discord` reads DiscordChatExporter JSON and writes the ``preference_jsonl``
layout (`hps_jax.data.datasets.preference_jsonl`)."""

from hps_jax.collect.discord import (
  BUILTIN_GRAMMARS,
  DiscordCollector,
  ExportError,
  load_grammar,
  require_ijson,
)

__all__ = ["BUILTIN_GRAMMARS", "DiscordCollector", "ExportError", "load_grammar", "require_ijson"]
