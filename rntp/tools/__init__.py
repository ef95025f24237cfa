"""Measuring tools: memory and FLOPs of a config before it runs (`plan`), the step's phases side by side
on CPU (`bench`), and every GPU figure in one staged run (`gpu_check`)."""
