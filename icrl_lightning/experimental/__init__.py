"""Work under study: options that are measured in the study of issue 16 and not yet part of a
recommended recipe. The core never imports this package; a config selects what is here by class
path (e.g. ``data.behaviour: {class_path: icrl_lightning.experimental.<module>.<Class>}``), and a
module that needs its own model or data-module class runs through its own command: a
``main(args)`` that calls ``icrl_lightning.cli.main`` with its classes (``python -m
icrl_lightning.experimental.<module>``, or a sweep setting's ``cli``). What helps moves into the
core; what does not is deleted and its result kept in docs/results.md ("Options removed, with
their results"). Nothing is under study at present: the last study, an optimistic teacher, joined
the core in session 35 (``model.teacher``)."""
