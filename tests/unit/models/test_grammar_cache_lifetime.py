"""PaliGemma's grammar builders are cached per processor and go away with it: the cache entry must
not itself keep the processor (and its tokenizer) alive, or every processor a long-lived process
loads (Serve reloading adapters, eval grids) stays in memory."""

import gc
import weakref

from raytrain.models import family


def test_the_grammar_cache_lets_its_processor_go(tiny_model_path):
    from raytrain.models import paligemma

    fam = family("paligemma")
    processor = fam.load_processor(tiny_model_path)
    for kind, labels in (("box", ["red circle"]), ("point", ["blue square"]), ("region", [])):
        assert fam.grammar(processor, kind, labels, (64, 64)) is not None
    key, ref = id(processor), weakref.ref(processor)
    assert key in paligemma._GRAMMARS
    del processor
    gc.collect()
    assert ref() is None, "the grammar cache kept the processor alive"
    assert key not in paligemma._GRAMMARS  # the finalizer dropped the entry
