"""The embedded toy world: a renderer, GenEval-format prompts, a verifier, and the recipe of a base model that
can draw but composes unreliably, so post-training on it measures something.

Why a noisy base. A real text-to-image base (SD3.5-Medium: GenEval 0.63 with guidance) can draw every object
GenEval asks for; its failures are in the *distribution*: it puts real mass on wrong counts, colours and
positions, partly because web captions often describe something other than the image. Reward post-training
moves that mass (DGPO reaches 0.97). A toy base that fails because it cannot draw (blobs, wrong sizes) gives
a reward nothing to select, and every comparison made on it measures nothing.

How the toy base gets there (`make toy-base`: the two recipes in `pipeline/toy/recipes/`, run by
`stages/toy_pretrain.py`; keys in `ToyPretrainConfig`):
- capability (stage 1, 2,400 steps from seed 0): a small `UNet2DConditionModel` (convolutions at 32/16/8 px,
  cross-attention at 8x8) trained by rectified flow on renders of every prompt of the world, long enough to
  draw each shape cleanly;
- unreliability (stage 2, 800 steps from stage 1): with probability `caption_noise` = 0.7 a prompt of the
  `noisy_kinds` (two objects, counting, position) is paired with a render of `prompts.noisy_scene(prompt)`,
  the same caption over a scene with one fact changed that fails it (a missing object, a count off by one,
  the moved object on another side). The right scene keeps 30 % of each such caption's mass (for a side
  still the likeliest single outcome, the other three sharing 70 %), so the words keep their meaning while
  most of the mass goes to wrong compositions the model can also draw right, as on web captions that often
  describe something else than the image. Colours stay clean:
  colour noise makes a pixel's colour multimodal and a 16-step sampler then paints averaged, off-palette
  colours, a drawing failure rather than a composition one (stage 1 had it, with colours right on 0.28).

How a noisy scene differs from its caption is one `prompts.CaptionNoise` (per kind: two-sided, so the
caption's fact stays the likeliest, or one-sided, so above rate 1/2 a single wrong fact is, which guidance at
sampling amplifies); `train_text_encoder=false` keeps the text encoder fixed in a noisy stage, as the ceiling
and stage two do. Both are measured in docs/research/LOG.md and off in the shipped recipes.

`gdro toy score` checks a base against its targets (strict accuracy 0.25-0.55, single objects >= 0.85,
quality >= 0.8 x that of true renders); `gdro toy ceiling` measures how far ground-truth data would take it.
"""
