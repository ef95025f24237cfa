"""The packed forward: shared-prefix packs (`packing`), the attention that follows their layout
(`attention`), and teacher-forced scoring of thoughts and targets (`scoring`), which the reward and the
loss both read."""
