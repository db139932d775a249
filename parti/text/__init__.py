"""SentencePiece text tokenizer: train, encode, pad, decode."""
