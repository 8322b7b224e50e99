"""Work under study: options that are measured in the study of issue 16 and not yet part of a
recommended recipe. The core never imports this package; a config selects what is here by class
path (e.g. ``data.behaviour: {class_path: icrl_lightning.experimental.<module>.<Class>}``).
What helps moves into the core; what does not is deleted and its result kept in docs/results.md
("Options removed, with their results"). Under study at present: ``teacher`` (an optimistic
tabular learner's greedy actions as a large-margin loss beside double DQN; its own command
``python -m icrl_lightning.experimental.teacher``, or a sweep setting's ``cli``)."""
