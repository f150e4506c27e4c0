"""Student models (installed as ``xmodal.students``)."""
