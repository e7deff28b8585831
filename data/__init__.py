"""Small files the project ships (concept word lists, class names, CLIP configs), read with
:mod:`importlib.resources` so that an installed wheel finds them without the checkout."""
