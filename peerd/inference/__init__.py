"""Serving a model across the swarm: sharded inference and speculative decoding.

    face.py         the typed face every caller uses: LanguageModel, Completion, errors; light
    options.py      what a request may ask for (sampling, speculative) and its limits; light
    slot.py         this daemon's model slot (none, loading, ready, failed): the service; light
    served.py       the face over a loaded runtime
    runtime.py      one model on one peer: load, place, serve, generate
    generate.py     the entry peer's Generator: routes, sessions, prepare, generate, score
    request.py      a prepared request, its stats and log-probabilities; light
    decoding.py     one request's decoding, round by round, with failover
    sampling.py     choosing the next token; scoring tokens
    text.py         token ids to streamed text, with stop strings
    model/          the model on one peer: source, weights, shard block, head
    swarm/          routing, placement, the pipeline client and the shard server
    speculative/    drafters, EAGLE, token trees, acceptance, γ

This file imports nothing on purpose: the pure modules (routing, placement,
acceptance) must not pay for importing torch and transformers.
"""
