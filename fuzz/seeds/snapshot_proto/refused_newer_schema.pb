
a.budp:1"g*
10.0.0.0/8
w.bauto2identity-echo"
uu@xg *
g20a