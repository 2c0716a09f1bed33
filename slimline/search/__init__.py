"""Recipe search under budgets: a space of recipes (``space``), Optuna proposing and Ray running trials
(``study``)."""
