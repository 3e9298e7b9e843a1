"""Which trial a study recommends and how it is shown: selection, export, the catalog of studies, the
summary, the report and its figures."""
