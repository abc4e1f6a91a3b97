"""Study packages: code that serves one study (its world, its model, its candidates), kept out of the core.

``import idesign`` does not import them; a study (or a notebook) imports its package explicitly,
e.g. ``from idesign.studies import cfdna``. A study package may import the core; the core never
imports a study package.
"""
