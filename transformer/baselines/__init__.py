"""Recurrent baselines the Transformer is measured against: LSTM and GRU layers and an LSTM
encoder-decoder with additive attention, with the Transformer's decoding interface."""

from transformer.baselines.rnn import GRU, LSTM, CudnnLSTM, LSTMSeq2Seq, RNNConfig

__all__ = ["GRU", "LSTM", "CudnnLSTM", "LSTMSeq2Seq", "RNNConfig"]
