"""Speculative decoding across the pipeline (DSD): draft at the entry peer, verify in
one pass through the shards.

    drafters.py       the drafter interface (imports no drafter)
    ngram.py          the ngram drafter: prompt lookup
    draft_model.py    the model:SPEC drafter: a small LM with the target's tokenizer
    catalog.py        the entry peer's drafters, built by name on first use
    eagle.py          EAGLE: a one-layer draft head over the target's features
    eagle_file.py     EAGLE head files, bound to the target they were trained for
    eagle_data.py     the target's answers and features an EAGLE head learns from
    eagle_train.py    training an EAGLE head on a CPU
    eagle_measure.py  a drafter's acceptance replayed on held-out answers
    vocab.py          a draft vocabulary (FR-Spec)
    tree.py           token trees and their attention mask
    acceptance.py     pure: which drafted tokens the target keeps (greedy, sample, adaptive)
    gamma.py          pure: how much to draft next round
"""
