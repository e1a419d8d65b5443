"""Baselines scored in the same report as EhrMamba: XGBoost on code counts (more to come: LSTM, BERT-style
Transformer, BigBird, MultiBird)."""
