"""The view: figures (:mod:`~nbconn.view.plots`, matplotlib) and the widget panel (:mod:`~nbconn.view.widgets`).

Nothing below imports the view; nothing is imported here, so matplotlib and ipywidgets load only with the module
that needs them.
"""
