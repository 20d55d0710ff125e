"""Synthetic DiscordChatExporter JSON exports (with --media layout) with known ground truth, for the collector tests.

`dreambot_exports(folder)` writes two exports in two schema versions (a current one with roles / inlineEmojis /
components / interaction, a 2023-style one without them) that overlap by one session, and returns their paths, the
true records and the expected exclusion counts. `upscale_export(folder)` does the same for Midjourney-style buttons.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
from PIL import Image

BOT = {"id": "999", "name": "DreamBot", "discriminator": "0000", "nickname": "DreamBot", "isBot": True}
MJ = {"id": "998", "name": "Midjourney Bot", "discriminator": "9282", "nickname": "Midjourney Bot", "isBot": True}
A = {"id": "111", "name": "alice", "discriminator": "0001", "nickname": "Alice", "isBot": False}
B = {"id": "222", "name": "bob", "discriminator": "0002", "nickname": None, "isBot": False}
C = {"id": "333", "name": "carol", "discriminator": "0003", "nickname": "C", "isBot": False}


def image(seed: int, size=(64, 64)) -> np.ndarray:
  """A smooth random RGB image (distinct per seed; its difference hash survives JPEG re-encoding)."""
  small = np.random.default_rng(seed).integers(0, 256, (6, 6, 3), dtype=np.uint8)
  return np.asarray(Image.fromarray(small).resize(size, Image.Resampling.BICUBIC))


def encode(a: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(a).save(buf, format=fmt, **kw)
  return buf.getvalue()


def grid(tiles: list[np.ndarray], rows: int, cols: int) -> np.ndarray:
  h, w = tiles[0].shape[:2]
  out = np.zeros((rows * h, cols * w, 3), np.uint8)
  for i, t in enumerate(tiles):
    r, c = divmod(i, cols)
    out[r * h : (r + 1) * h, c * w : (c + 1) * w] = t
  return out


class ExportWriter:
  """Messages of one channel export; attachments are written to ``<name>_Files/`` next to the export."""

  def __init__(self, folder: Path, name: str, *, schema: str = "current", first_id: int = 1000, start=None):
    self.folder = Path(folder)
    self.path = self.folder / name
    self.media = self.folder / f"{name}_Files"
    self.schema = schema
    self.next_id = first_id
    self.t = start or datetime(2022, 8, 10, 12, 0, tzinfo=timezone.utc)
    self.messages: list[dict] = []

  def attach(self, file_name: str, data: bytes | None = None, url: str | None = None) -> dict:
    """An attachment; data=None: the file is not written (deleted media)."""
    if data is not None:
      self.media.mkdir(parents=True, exist_ok=True)
      (self.media / file_name).write_bytes(data)
    self.next_id += 1
    return {
      "id": str(self.next_id),
      "url": url or f"{self.path.name}_Files/{file_name}",
      "fileName": file_name,
      "fileSizeBytes": len(data or b""),
    }

  def message(self, author, content="", attachments=(), reference=None, edited=False, interaction=None, mentions=()):
    self.next_id += 1
    self.t += timedelta(seconds=30)
    m = {
      "id": str(self.next_id),
      "type": "Reply" if reference else "Default",
      "timestamp": self.t.isoformat(timespec="milliseconds"),
      "timestampEdited": (self.t + timedelta(seconds=20)).isoformat() if edited else None,
      "callEndedTimestamp": None,
      "isPinned": False,
      "content": content,
      "author": dict(author),
      "attachments": list(attachments),
      "embeds": [],
      "stickers": [],
      "reactions": [],
      "mentions": [dict(u) for u in mentions],
    }
    if reference:
      m["reference"] = {"messageId": reference, "channelId": "5", "guildId": "7"}
    if self.schema == "current":
      m["author"]["roles"] = []
      m["inlineEmojis"] = []
      m["components"] = []
      if interaction:
        m["interaction"] = interaction
    self.messages.append(m)
    return m["id"]

  def write(self) -> Path:
    doc = {
      "guild": {"id": "7", "name": "Stable Foundation", "iconUrl": ""},
      "channel": {"id": "5", "type": "GuildTextChat", "categoryId": "3", "category": "dream", "name": "dream-1"},
      "dateRange": {"after": None, "before": None},
      "exportedAt": "2023-01-01T00:00:00+00:00",
      "messages": self.messages,
      "messageCount": len(self.messages),
    }
    self.path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return self.path


def dreambot_exports(folder: Path):
  """-> ([export paths], true records [{prompt, chosen, images: [arrays]}], expected exclusion counts)."""
  folder = Path(folder)
  truth = []
  w = ExportWriter(folder, "current.json", schema="current", first_id=10_000)

  # chatter
  w.message(A, "hello everyone")
  w.message(BOT, "The queue is busy, please wait")

  # S1: 4 tiles in a 2x2 grid; the selection is tile 2 re-encoded as JPEG (perceptual hash); the bot answers the
  # image-conditioned request with 4 separate images nobody selects (no_selection)
  fox = [image(100 + i) for i in range(4)]
  req = w.message(A, '!dream "a red fox in snow" -n 4 -S 42')
  w.message(B, "nice")
  w.message(
    BOT, '<@111> "a red fox in snow" seeds: 42, 43, 44, 45', [w.attach("grid_fox.png", encode(grid(fox, 2, 2)))], req
  )
  truth.append({"prompt": "a red fox in snow", "chosen": 2, "images": fox, "seeds": [42, 43, 44, 45]})
  sel = w.message(A, '!dream "a red fox in snow" -n 4', [w.attach("fox_pick.jpg", encode(fox[2], "JPEG", quality=85))])
  w.message(
    BOT, '<@111> "a red fox in snow"', [w.attach(f"fox2_{i}.png", encode(image(150 + i))) for i in range(4)], sel
  )

  # S2 (interleaved with S3): 3 separate images; the selection sends attachment 1's exact bytes (no reply to it)
  castle = [image(200 + i) for i in range(3)]
  req2 = w.message(B, '!dream "castle on a hill" -n 3')
  # S3: a 1x2 grid whose reply has no reference (matched by user + prompt); selection: tile 1 as PNG
  lagoon = [image(300 + i) for i in range(2)]
  w.message(A, '!dream "blue   lagoon" -n 2')
  castle_atts = [w.attach(f"castle_{i}.png", encode(a)) for i, a in enumerate(castle)]
  w.message(BOT, '<@222> "castle on a hill" -S 7', castle_atts, req2)
  reply2 = w.messages[-1]
  req2_msg = next(m for m in w.messages if m["id"] == req2)
  w.message(BOT, '<@111> "blue lagoon"', [w.attach("lagoon.png", encode(grid(lagoon, 1, 2)))], mentions=[A])
  w.message(C, "lol")
  w.message(B, '!dream "castle on a hill"', [w.attach("castle_pick.png", (w.media / "castle_1.png").read_bytes())])
  truth.append({"prompt": "castle on a hill", "chosen": 1, "images": castle, "seeds": [7]})
  w.message(A, '!dream "blue lagoon" -n 2', [w.attach("lagoon_pick.png", encode(lagoon[1]))])
  truth.append({"prompt": "blue lagoon", "chosen": 1, "images": lagoon})

  # S4: an edited request; selection of image 1 re-encoded as JPEG
  sunset = [image(400 + i) for i in range(2)]
  req4 = w.message(C, '!dream "sunset over sea" -n 2', edited=True)
  w.message(
    BOT, '<@333> "sunset over sea"', [w.attach(f"sunset_{i}.png", encode(a)) for i, a in enumerate(sunset)], req4
  )
  w.message(C, '!dream "sunset over sea" -n 2', [w.attach("sunset_pick.jpg", encode(sunset[1], "JPEG", quality=70))])
  truth.append({"prompt": "sunset over sea", "chosen": 1, "images": sunset})

  # a request conditioned on the user's own upload: excluded (user_upload)
  upload = w.message(B, '!dream "my cat as a king" -n 4', [w.attach("my_cat.jpg", encode(image(999), "JPEG"))])
  w.message(
    BOT,
    '<@222> "my cat as a king"',
    [w.attach("cat_grid.png", encode(grid([image(500 + i) for i in range(4)], 2, 2)))],
    upload,
  )

  # NSFW: a spoiler-tagged reply, and a reply the bot marks NSFW
  r = w.message(C, '!dream "something spicy" -n 2')
  w.message(
    BOT, '<@333> "something spicy"', [w.attach(f"SPOILER_s{i}.png", encode(image(600 + i))) for i in range(2)], r
  )
  r = w.message(C, '!dream "another one" -n 2')
  w.message(
    BOT, "Potential NSFW content detected", [w.attach(f"n{i}.png", encode(image(610 + i))) for i in range(2)], r
  )

  # missing media: a deleted local file, and remote URLs (not exported with --media)
  r = w.message(A, '!dream "gone" -n 2')
  w.message(BOT, '<@111> "gone"', [w.attach("gone_0.png"), w.attach("gone_1.png")], r)
  r = w.message(A, '!dream "remote" -n 2')
  urls = [f"https://cdn.discordapp.com/attachments/1/2/r{i}.png" for i in range(2)]
  w.message(BOT, '<@111> "remote"', [w.attach(f"r{i}.png", url=u) for i, u in enumerate(urls)], r)

  # one candidate only
  r = w.message(B, '!dream "single"')
  w.message(BOT, '<@222> "single"', [w.attach("single.png", encode(image(700)))], r)

  # an attachment path outside the export's folder: refused
  outside = folder.parent / f"{folder.name}_outside.png"
  outside.write_bytes(encode(image(710)))
  r = w.message(A, '!dream "escape" -n 2')
  atts = [w.attach("e0.png", encode(image(711))), w.attach("x", url=f"../{outside.name}")]
  atts[1]["fileName"] = "x.png"
  w.message(BOT, '<@111> "escape"', atts, r)

  # ambiguous: two near-identical candidates; the JPEG returned is within the threshold of both
  twin = image(800)
  twin2 = twin.copy()
  twin2[0, 0] = 255 - twin2[0, 0]
  r = w.message(C, '!dream "twin stars" -n 2')
  w.message(BOT, '<@333> "twin stars"', [w.attach("t0.png", encode(twin)), w.attach("t1.png", encode(twin2))], r)
  w.message(C, '!dream "twin stars" -n 2', [w.attach("t_pick.jpg", encode(twin, "JPEG", quality=80))])
  w.message(BOT, "Thanks!")
  current = w.write()

  # a 2023-style export (no roles / inlineEmojis / components) that overlaps the first by S2's request and reply
  v = ExportWriter(folder, "old.json", schema="2023", first_id=50_000, start=w.t + timedelta(hours=3))
  v.messages.append(json.loads(json.dumps(req2_msg)))
  v.messages.append(json.loads(json.dumps(reply2)))
  v.media.mkdir(parents=True, exist_ok=True)
  for i in range(3):  # the overlapping reply's files, as the second export's --media folder holds them
    (v.media / f"castle_{i}.png").write_bytes((w.media / f"castle_{i}.png").read_bytes())
  for m in v.messages:
    for a in m["attachments"]:
      a["url"] = a["url"].replace("current.json_Files", "old.json_Files")
  robot = [image(900 + i) for i in range(4)]
  r = v.message(C, '!dream "old style robot" -n 4')
  v.message(BOT, '<@333> "old style robot"', [v.attach(f"robot_{i}.png", encode(a)) for i, a in enumerate(robot)], r)
  v.message(C, '!dream "old style robot"', [v.attach("robot_pick.png", (v.media / "robot_3.png").read_bytes())])
  truth.append({"prompt": "old style robot", "chosen": 3, "images": robot})
  old = v.write()

  expected = {
    "user_upload": 1,
    "nsfw": 2,
    "missing_media": 2,
    "unsafe_path": 1,
    "too_few_candidates": 1,
    "duplicate_session": 1,
    "ambiguous_selection": 1,
    "no_selection": 2,  # S1's follow-up reply, the twin session
    "no_reply": 5,  # the selection requests of S2, S3, S4, the twins and the robot
  }
  return [current, old], truth, expected


def upscale_export(folder: Path):
  """Midjourney-style: grids (slash-command interactions, no request message) and U-buttons / "Image #k"."""
  folder = Path(folder)
  w = ExportWriter(folder, "mj.json", schema="current", first_id=70_000)
  truth = []
  owl = [image(1000 + i) for i in range(4)]
  inter = {"id": "1", "name": "imagine", "user": {"id": "111", "name": "alice"}}
  g1 = w.message(
    MJ, "**an owl at night** - <@111> (fast)", [w.attach("owl.png", encode(grid(owl, 2, 2)))], interaction=inter
  )
  w.message(B, "wow")
  w.message(MJ, "**an owl at night** - Image #3 <@111>", [w.attach("owl_u3.png", encode(owl[2]))], g1)
  truth.append({"prompt": "an owl at night", "chosen": 2, "images": owl})
  tree = [image(1100 + i) for i in range(4)]
  req = w.message(B, "/imagine prompt: a tree in fog")
  g2 = w.message(MJ, "**a tree in fog** - <@222> (relaxed)", [w.attach("tree.png", encode(grid(tree, 2, 2)))], req)
  w.message(
    MJ,
    "**a tree in fog** - Upscaled by <@222>",
    [w.attach("tree_u1.png", encode(tree[0]))],
    g2,
    interaction={"id": "2", "name": "U1", "user": {"id": "222"}},
  )
  truth.append({"prompt": "a tree in fog", "chosen": 0, "images": tree})
  w.message(
    MJ,
    "**a lone grid** - <@333>",
    [w.attach("lone.png", encode(grid([image(1200 + i) for i in range(4)], 2, 2)))],
    interaction={"name": "imagine", "user": {"id": "333"}},
  )
  return w.write(), truth, {"no_selection": 1}
