"""A transformers >= 5 CLIP dir (`save_pretrained` of model + tokenizer: tokenizer.json, no vocab.json/merges.txt)
with its own small vocabulary whose end token is NOT the largest id: the checkpoint's tokenizer is found and read
from tokenizer.json, the text embedding is pooled where transformers pools it (first `eos_token_id`), and ids beyond
the embedding table are refused with a one-line error instead of scoring NaN."""

import gzip
import json

import numpy as np
import pytest
from PIL import Image

from hps_jax.convert import clip as cc
from hps_jax.convert.io import CheckpointError
from hps_jax.data.preprocess import PreprocessConfig
from hps_jax.data.tokenizer import CLIPTokenizer, byte_alphabet, default_bpe_path
from hps_jax.models.clip import CLIPConfig
from hps_jax.preference.scorer import Scorer
from tests.data.test_tokenizer import CORPUS
from tests.refs import features, randomize_

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

N_MERGES = 300
BOS, EOS = 512, 513  # right after the 512 byte symbols; the merged tokens (514..813) have larger ids
PROMPTS = [
  "a photo of a cat",
  "the Eiffel Tower in the style of Van Gogh",
  "",
  "an astronaut riding a horse on the moon " * 12,
  "Weird image. a bowl of fruit, trending on artstation",
  "café &amp; croissant 😀",
]


@pytest.fixture(scope="module")
def custom_dir(tmp_path_factory):
  """(transformers CLIPModel, transformers CLIPTokenizer, dir holding config.json + model.safetensors +
  tokenizer.json + tokenizer_config.json only)."""
  symbols = list(byte_alphabet().values())
  with gzip.open(default_bpe_path(), "rt", encoding="utf-8") as f:
    merges = [tuple(line.split()) for line in f.read().split("\n")[1 : N_MERGES + 1]]
  tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"] + ["".join(m) for m in merges]
  vocab = {t: i for i, t in enumerate(tokens)}
  assert len(vocab) == len(tokens) and vocab["<|endoftext|>"] == EOS < max(vocab.values())
  src = tmp_path_factory.mktemp("custom_vocab_src")
  (src / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (src / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
  tok = transformers.CLIPTokenizer.from_pretrained(str(src))
  assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)) == (BOS, EOS, EOS, len(vocab))

  hf_cfg = transformers.CLIPConfig.from_dict(cc.config_to_hf(CLIPConfig.tiny(vocab_size=len(vocab))))
  hf_cfg.text_config.eos_token_id, hf_cfg.text_config.bos_token_id, hf_cfg.text_config.pad_token_id = EOS, BOS, EOS
  model = randomize_(transformers.CLIPModel(hf_cfg).eval(), seed=11)
  d = tmp_path_factory.mktemp("custom_vocab") / "clip"
  model.save_pretrained(d)
  tok.save_pretrained(d)
  for name in ("vocab.json", "merges.txt", "special_tokens_map.json"):
    (d / name).unlink(missing_ok=True)
  assert (d / "tokenizer.json").exists()
  return model, tok, d


def _reference_hps(model, tok, images, prompts):
  pre = PreprocessConfig(mode="pad", size=model.config.vision_config.image_size)
  pixels = np.stack([pre.apply(Image.fromarray(im)) for im in images]).transpose(0, 3, 1, 2)
  ids = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
  with torch.no_grad():
    img = features(model.get_image_features(pixel_values=torch.from_numpy(pixels)))
    txt = features(model.get_text_features(input_ids=torch.from_numpy(ids).long()))
  img /= np.linalg.norm(img, axis=-1, keepdims=True)
  txt /= np.linalg.norm(txt, axis=-1, keepdims=True)
  return 100 * (img * txt).sum(-1)


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  shapes = [(40, 24), (17, 33), (32, 32), (64, 80), (9, 50), (120, 31)]
  return [rng.integers(0, 256, shapes[i % len(shapes)] + (3,), dtype=np.uint8) for i in range(n)]


def test_tokenizer_json_ids_equal_transformers(custom_dir, tmp_path):
  _, hf, d = custom_dir
  want = hf(CORPUS, padding="max_length", max_length=77, truncation=True, return_tensors="np")["input_ids"]
  assert (want > EOS).any()  # merged tokens above the end token occur: argmax pooling would be wrong
  ours = CLIPTokenizer.from_hf_dir(d)
  assert (ours.start_id, ours.end_id, ours.pad_id, ours.vocab_size) == (BOS, EOS, EOS, len(hf))
  assert str(d / "tokenizer.json") in ours.source
  np.testing.assert_array_equal(ours(CORPUS), want)
  # older tokenizers versions write merges as "a b" strings instead of pairs
  tj = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
  tj["model"]["merges"] = [" ".join(m) if isinstance(m, list) else m for m in tj["model"]["merges"]]
  (tmp_path / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
  (tmp_path / "tokenizer_config.json").write_text((d / "tokenizer_config.json").read_text())
  np.testing.assert_array_equal(CLIPTokenizer.from_path(tmp_path / "tokenizer.json")(CORPUS), want)


def test_scorer_equals_transformers_on_custom_vocab(custom_dir, capsys, parity):
  model, tok, d = custom_dir
  scorer = Scorer.from_checkpoint(d)  # no tokenizer argument: the dir's tokenizer.json
  assert f"tokenizer: Hugging Face tokenizer {d / 'tokenizer.json'}" in capsys.readouterr().err
  assert scorer.config.eos_token_id == EOS and scorer.config.vocab_size == len(tok)
  images = _images(len(PROMPTS), seed=3)
  want = _reference_hps(model, tok, images, PROMPTS)
  got = scorer.score(images, PROMPTS)
  assert np.isfinite(got).all()
  parity(
    "Scorer vs transformers CLIPModel, custom vocab with eos_token_id not the largest id: HPS",
    np.abs(got - want).max(),
    1e-2,
  )
  # the legacy argmax pooling would read the wrong position here: the test can see the difference
  legacy = Scorer(cc.load_clip(d, config=scorer.config.replace(eos_token_id=None)), scorer.tokenizer)
  assert np.abs(legacy.score(images, PROMPTS) - want).max() > 0.1


def test_eos_token_id_config_round_trip():
  for eos in (None, EOS, 49407):
    cfg = CLIPConfig.tiny(eos_token_id=eos)
    assert cc.config_from_hf(cc.config_to_hf(cfg)) == cfg
    assert cc.config_from_hf(transformers.CLIPConfig.from_dict(cc.config_to_hf(cfg)).to_dict()) == cfg
  hf = cc.config_to_hf(CLIPConfig.tiny())
  assert hf["text_config"]["eos_token_id"] == 2  # transformers' legacy value: argmax pooling
  del hf["text_config"]["eos_token_id"]
  assert cc.config_from_hf(hf).eos_token_id == 49407  # transformers' CLIPTextConfig default
  hf["text_config"]["eos_token_id"] = 5000
  hf["text_config"]["vocab_size"] = 1000
  with pytest.raises(CheckpointError, match="eos_token_id 5000"):
    cc.config_from_hf(hf)
  with pytest.raises(ValueError, match="eos_token_id"):
    CLIPConfig.tiny(vocab_size=100, eos_token_id=100)


def test_ids_beyond_the_embedding_table_raise(custom_dir, tmp_path):
  _, tok, d = custom_dir
  default = CLIPTokenizer.default()
  with pytest.raises(CheckpointError) as err:
    Scorer.from_checkpoint(d, tokenizer=default)
  msg = str(err.value)
  assert "\n" not in msg and default.source in msg and str(d) in msg and "49407" in msg and f"{len(tok)}-token" in msg
  # a dir without any tokenizer falls back to the default BPE: refused at load, not NaN scores
  bare = tmp_path / "bare"
  bare.mkdir()
  for name in ("config.json", "model.safetensors"):
    (bare / name).write_bytes((d / name).read_bytes())
  with pytest.raises(CheckpointError, match="default CLIP BPE file"):
    Scorer.from_checkpoint(bare)
  # a Scorer built around a mismatched tokenizer refuses at tokenization, before running the model
  scorer = Scorer(cc.load_clip(d), default)
  with pytest.raises(CheckpointError, match=rf"token id \d+, but checkpoint \(in memory\) has a {len(tok)}-token"):
    scorer.score(_images(1), "a photo of a cat")
