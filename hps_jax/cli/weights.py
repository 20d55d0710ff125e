"""`hps-jax weights`: list, locate, download and verify the published weights hps_jax knows by name (the registry in
`hps_jax.weights`; cache `$HPS_JAX_CACHE` or ~/.cache/hps_jax)."""

from __future__ import annotations

from hps_jax import weights
from hps_jax.cli.common import EXIT_OK, EXIT_USAGE, UsageError, add_parser


def add_weights(sub):
  p = add_parser(
    sub,
    "weights",
    help="list, locate and verify the published weights hps_jax knows (cache, sha256)",
    description="The published weights hps_jax knows by name (HPS v1/v2/v2.1, CLIP, PickScore, the LAION aesthetic "
    "heads, the FID Inception, SD v1.4), kept in $HPS_JAX_CACHE (default ~/.cache/hps_jax) and checked by sha256 "
    "(published, or pinned at first download). Nothing is downloaded with HF_HUB_OFFLINE=1 or HPS_JAX_OFFLINE=1.",
  )
  actions = p.add_subparsers(dest="action", metavar="ACTION", title="actions", required=True)
  add_parser(actions, "list", help="every known name: description, present/missing, cache path")
  q = add_parser(actions, "path", help="print NAME's cache path (exit 2 if it is not in the cache)")
  q.add_argument("name", metavar="NAME", help="a registry name (see `hps-jax weights list`)")
  q.add_argument("--download", action="store_true", help="download NAME into the cache when it is missing")
  v = add_parser(actions, "verify", help="re-hash cached files against their published or pinned sha256")
  v.add_argument("name", metavar="NAME", nargs="?", help="one registry name (default: every one in the cache)")
  p.set_defaults(run=run_weights)


def run_weights(args) -> int:
  try:
    if args.action == "list":
      return _list()
    if args.action == "path":
      if not args.download and not weights.is_present(args.name):
        e = weights.get(args.name)
        raise UsageError(f"{e.name}: not in the cache: {weights.cache_path(e)} (from {e.url}; --download fetches it)")
      print(weights.resolve(args.name, download_missing=args.download))
      return EXIT_OK
    return _verify(args.name)
  except weights.WeightsError as e:
    raise UsageError(str(e)) from e


def _list() -> int:
  width = max(map(len, weights.REGISTRY))
  for name, e in weights.REGISTRY.items():
    state = "present" if weights.is_present(e) else "missing"
    print(f"{name:<{width}}  {state:<7}  {weights.cache_path(e)}  {e.description}")
  return EXIT_OK


def _verify(name: str | None) -> int:
  names = [weights.get(name).name] if name else [n for n in weights.REGISTRY if weights.is_present(n)]
  if name and not weights.is_present(name):
    raise UsageError(f"{name}: not in the cache (expected at {weights.cache_path(name)}; from {weights.get(name).url})")
  failed = 0
  for n in names:
    try:
      sha = weights.check(n, rehash=True)
      print(f"{n}: ok sha256 {sha} ({'published' if weights.get(n).sha256 else 'pinned'})")
    except weights.WeightsError as e:
      print(f"{n}: FAILED {e}")
      failed += 1
  if not names:
    print(f"nothing in the cache ({weights.cache_dir()})")
  return EXIT_USAGE if failed else EXIT_OK
