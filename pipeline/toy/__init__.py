"""The embedded toy world: a renderer, GenEval-format prompts, a verifier, and the recipe of a base model that
can draw but composes unreliably, so post-training on it measures something.

Why a noisy base. A real text-to-image base (SD3.5-Medium: GenEval 0.63 with guidance) can draw every object
GenEval asks for; its failures are in the *distribution*: it puts real mass on wrong counts, colours and
positions, partly because web captions often describe something other than the image. Reward post-training
moves that mass (DGPO reaches 0.97). A toy base that fails because it cannot draw (blobs, wrong sizes) gives
a reward nothing to select, and every comparison made on it measures nothing.

How the toy base gets there (`stages/toy_pretrain.py`, defaults in `ToyPretrainConfig`):
- capability: a small `UNet2DConditionModel` (convolutions at 32/16/8 px, cross-attention at 8x8) trained by
  rectified flow on true renders of every prompt of the world, long enough to draw each shape cleanly;
- unreliability: with probability `caption_noise` a compositional prompt's training image is a render of
  `prompts.perturb(prompt)`, the same caption over a scene with one fact changed (a missing object, a count
  off by one, another colour, the opposite relation, swapped colours); single-object captions stay clean.
  The model's conditional distribution then mixes right and wrong compositions it can draw equally well.

`gdro toy score` checks a base against its targets (strict accuracy 0.25-0.55, single objects >= 0.85,
quality >= 0.8 x that of true renders); `gdro toy ceiling` measures how far ground-truth data would take it.
"""
