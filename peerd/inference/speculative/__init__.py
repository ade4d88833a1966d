"""Speculative decoding across the pipeline (DSD): draft at the entry peer, verify in
one pass through the shards.

    drafters.py     the drafter interface, ngram and model drafters, the catalog
    eagle.py        EAGLE: a one-layer draft head over the target's features
    eagle_file.py   EAGLE head files, bound to the target they were trained for
    eagle_train.py  training an EAGLE head on a CPU
    vocab.py        a draft vocabulary (FR-Spec)
    tree.py         token trees and their attention mask
    acceptance.py   pure: which drafted tokens the target keeps (greedy, sample, adaptive)
    gamma.py        pure: how much to draft next round
"""
