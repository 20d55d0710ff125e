"""Preference-classifier training (the HPS model): `--config hps_classifier:{tiny,paper}` (or the
file's path, configs/hps_classifier.py:tiny).

  tiny   offline: a tiny random-init CLIP on the synthetic preference set; a few minutes on 2 CPU cores.
  paper  the paper's recipe: CLIP ViT-L/14 (OpenAI weights, QuickGELU) from --config.model.checkpoint, last 10
         vision and last 6 text blocks trainable, AdamW lr 1.7e-5, wd 3.1e-3, cosine decay, batch 5, 1 epoch on
         HPD v1 (`--config.data.manual_dir` = the dataset's local folder).

Override anything with --config.key=value, e.g. --config.optim.lr=3e-5 --config.mesh.fsdp=4.
"""

import ml_collections

from hps_jax.configs import common

# Trainable sets, as regexes on parameter paths (see hps_jax/models/clip.py for the path names).
# Paper: the last 10 of 24 vision blocks and the last 6 of 12 text blocks. We also train what sits after those
# blocks — the final LayerNorms and the two projections (1.6M parameters): leaving them frozen would pin the
# embedding space to CLIP's while the blocks underneath move. logit_scale stays frozen at CLIP's 100: with n <= 4
# images per prompt, CE at that temperature is well scaled, and a trainable temperature lets the loss fall by
# sharpening without ranking better.
PAPER_TRAINABLE = [
  r"vision/blocks/(1[4-9]|2[0-3])/.*",
  r"text/blocks/([6-9]|1[01])/.*",
  r"vision/ln_post/.*",
  r"vision/proj",
  r"text/ln_final/.*",
  r"text/proj",
]

PRESETS = ("tiny", "paper")


def base():
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.init = "checkpoint"  # checkpoint | random
  c.model.checkpoint = ""  # HF dir, OpenAI-layout .pt (hpc.pt), open_clip .pt, safetensors
  c.model.format = "auto"
  c.model.activation = ""  # "" = inferred from the checkpoint; quick_gelu | gelu
  c.model.preset = "vit_l14"  # architecture for init=random
  c.model.dtype = "float32"  # compute dtype (bfloat16 on accelerators)
  c.model.param_dtype = "float32"
  c.model.remat = False
  c.model.attention_backend = "auto"

  c.trainable = list(PAPER_TRAINABLE)

  c.data = ml_collections.ConfigDict()
  c.data.dataset = "hpd_v1"  # hpd_v1 | hpd_v2 | pickapic | preference_jsonl | synthetic
  c.data.builder_config = ""
  c.data.data_dir = ""  # where TFDS writes the prepared ArrayRecord files ("" = WORKDIR/tfds)
  c.data.manual_dir = ""  # the dataset's local download
  c.data.train_split = "train"
  c.data.eval_split = "test"
  c.data.max_images = 4  # image slots per prompt (n <= 4 in HPD v1); more are truncated, chosen kept
  c.data.preprocess = "pad"  # pad (paper: longest edge, zero pad) | clip
  c.data.fill = 0
  c.data.tokenizer = ""  # "" = the checkpoint dir's tokenizer or the default CLIP BPE
  c.data.prefetch_threads = 4
  c.data.eval_max_prompts = 0  # 0 = the whole eval split
  c.data.synthetic_train_size = 2000
  c.data.synthetic_eval_size = 200
  c.data.synthetic_image_size = 48

  c.batch_size = 5  # prompts per global batch
  c.eval_batch_size = 16
  c.num_epochs = 1
  c.num_steps = -1  # -1: num_epochs over the train split

  c.optim = common.optimizer(1.7e-5, 3.1e-3, "cosine")
  common.mesh_and_rules(c)
  common.cadence(c, log_every=10, checkpoint_every=500)
  return c


def get_config(arg: str = "tiny"):
  c = base()
  if arg == "paper":
    return c
  if arg == "tiny":
    c.model.init = "random"
    c.model.preset = "tiny"
    # from random init the whole tower must learn; only the patch embedding and first vision block stay frozen,
    # which keeps the freezing machinery exercised.
    c.trainable = [
      r"vision/blocks/[1-9]\d*/.*",
      r"vision/(ln_pre|ln_post)/.*",
      r"vision/(proj|pos_embedding|class_embedding)",
      r"text/.*",
      r"logit_scale",
    ]
    c.data.dataset = "synthetic"
    c.batch_size = 16
    c.eval_batch_size = 32
    c.num_steps = 150
    c.optim.lr = 1e-3
    c.optim.weight_decay = 1e-4
    c.optim.warmup_steps = 20
    c.optim.grad_clip = 1.0
    c.log_every = 10
    c.eval_every = 50
    c.checkpoint_every = 50
    return c
  raise ValueError(f"unknown preset {arg!r}; choose from {', '.join(PRESETS)}")
