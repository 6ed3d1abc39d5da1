module example.com/phi4go

go 1.19
