"""Work under study: options that are measured in the study of issue 16 and not yet part of a
recommended recipe. The core never imports this package; a config selects what is here by class
path (e.g. ``data.behaviour: {class_path: icrl_lightning.experimental.<module>.<Class>}``).
What helps moves into the core; what does not is deleted and its result kept in docs/results.md
("Options removed, with their results"). Nothing is under study at present: the last two
behaviours measured here (noise-annealed demonstrations and random starts) were removed in
session 26."""
