"""Week 6: text as token sequences, recurrent networks (RNN, LSTM, GRU) from scratch and in
PyTorch, IMDB sentiment with packed sequences, GloVe and sequence-length studies."""
