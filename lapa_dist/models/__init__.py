"""Models: the latent action quantizer (LAQ) with its NSVQ codebook, and its transformer parts.

``laq.py`` is the LAQ encoder/decoder, ``nsvq.py`` the noise-substitution vector quantizer,
``attention.py`` the attention, feed-forward, position-bias and transformer blocks they share.
Models are plain ``nn.Module``s: no DeepSpeed, process groups or data pipeline in here.
"""
